"""One GBLR stage as a persistent, warp-specialised Gluon kernel with explicit partitions (Hopper).

It runs the jobs and host schedules of `_gblr_ws` (one program per SM walks a job list; a job is one BM × BN
output tile, the sum of the (BM × BK)·(BK × BN) products of its step list). The partitions are written out
here instead of left to Triton's automatic warp specialisation. On sm_90 that pass (Triton 3.6) waits for
every k-step's wgmma group to drain (`wgmma.wait_group 0`), has both consumer warpgroups wait for every
epilogue store to be read before the next job starts, and reads each job's step range through a second,
dependent table load. Measured on an H100 (docs/benchmarks/NOTES.md, GBLR "Session 6") this kernel is 2–4%
faster on the Llama shapes. The partitions:

  * producer (1 warp): streams every job's A / B tiles through TMA into a ring of NBUF slots (ready / empty
    mbarriers), running up to NBUF steps ahead across job boundaries;
  * two consumers (4 warps each): each owns half of the tile's rows and runs its own loop, barriers and
    epilogue, so the two drift and one's epilogue overlaps the other's MMAs. Each keeps one wgmma group in
    flight (`wait(1)`) and frees a ring slot as soon as the MMA reading it is done. It waits for an epilogue's
    TMA store only when the next epilogue needs the shared-memory tile again.

The two stages can run as a dependent pair (`stage(..., role=1 / 2)`, planned by `_gblr_ws.dependent_plan`):
stage 2 is a programmatic dependent launch whose programs take the SMs stage 1's programs leave, and its jobs
wait per row block for the stage-1 tiles they read, so stage 2 fills stage 1's uneven tail (on the 4096²
layer at M = 4096: 96.4–97.0 µs against 101.5–102.1 for two launches, NOTES GBLR "Session 7"):

  * stage 1 publishes each stored half-tile on its stage-2 row block's counter and on a total count: a
    consumer's TMA store completed (`cp.async.bulk.wait_group 0`), proxy fence, partition barrier, release
    fence, relaxed increments — two k-steps into its next job, so the store has completed by then;
  * stage 2's producer waits (acquire loads, the next job's read one job ahead) until a job's row block has
    all its publications, then orders them before its TMA reads with a proxy fence; once the total count is
    complete it stops waiting. The counts are never reset (a reset could race with a publication still in
    flight): they grow by the same amounts every call and stage 2's last program to finish counts the call,
    so each call (and CUDA-graph replay) waits for its own multiple. All zero is a valid fresh state.

Gluon has no interpreter: the CPU (and the tests without a Hopper GPU) run the Triton kernel of `_gblr_ws`.

Tables (int32): jobs (J, 8): row block, first step, end step, B column, output column, then (dependent pair)
stage 1: the counter it publishes on; stage 2: the publications its row block needs, the total; jptr (P + 1,);
steps (S, 2): A column and B row.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from structlin.kernels import sm_count

# the TMA copies' names: Triton 3.9 renamed them (and made the old names raise)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier      # (3.9 renamed it too)
PUBLISHERS = 2      # consumer partitions: each publishes its half of every stage-1 tile
PUB_AT = gl.constexpr(2)     # ... at this k-step of its next job (its store has completed by then)


@gluon.jit
def _asm(code: gl.constexpr):
    # one PTX statement with no operands, run by every thread of the partition
    gl.inline_asm_elementwise(code + " mov.b32 $0, 0;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _ld_acquire(ptr):
    # every thread loads (no broadcast through shared memory), so the value is waited for only where used
    return gl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [ptr], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _publish(cnt_ptr, idx, NCNT):
    """Release one stored h half-tile: this thread's TMA stores have written global memory (`wait_group 0`,
    not `tma.store_wait`'s `.read` form), ordered before generic-proxy accesses, every thread of the partition
    past that point, then a release fence and increments of the row block's and the total count."""
    _asm("cp.async.bulk.wait_group 0;")
    _asm("fence.proxy.async.global;")
    _barrier()
    _asm("fence.acq_rel.gpu;")
    gl.atomic_add(cnt_ptr + idx, 1, sem="relaxed", scope="gpu")
    gl.atomic_add(cnt_ptr + NCNT, 1, sem="relaxed", scope="gpu")


@gluon.jit
def _producer(a_desc, b_desc, jobs_ptr, jptr_ptr, steps_ptr, cnt_ptr, NCNT, a_bufs, b_bufs, ready, empty,
              ROLE: gl.constexpr):
    NB: gl.constexpr = a_bufs.shape[0]
    TBM: gl.constexpr = a_bufs.shape[1]
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    if ROLE == 1:       # the dependent (stage-2) launch may start on the SMs this launch's programs leave
        _asm("griddepcontrol.launch_dependents;")
    pid = gl.program_id(0)
    j0 = gl.load(jptr_ptr + pid)
    j1 = gl.load(jptr_ptr + pid + 1)
    if ROLE == 2:
        # the counts only grow: this is call E + 1 on them (E written by the previous call's last program), so a
        # count is complete at E + 1 times its need (int32 arithmetic wraps alike on both sides)
        e1 = _ld_acquire(cnt_ptr + NCNT + 2) + 1
        total = gl.load(jobs_ptr + 8 * j0 + 6, mask=j0 < j1, other=0) * e1
        # the first job's row-block count and the total count, read ahead
        got = _ld_acquire(cnt_ptr + gl.load(jobs_ptr + 8 * j0, mask=j0 < j1, other=0))
        tot = _ld_acquire(cnt_ptr + NCNT)
        waiting = 1
    p = 0
    for j in range(j0, j1):
        rb = gl.load(jobs_ptr + 8 * j)
        s0 = gl.load(jobs_ptr + 8 * j + 1)
        s1 = gl.load(jobs_ptr + 8 * j + 2)
        bcol = gl.load(jobs_ptr + 8 * j + 3)
        if ROLE == 2:   # wait until every stage-1 half-tile of this row block is published (acquire loads)
            if waiting == 1:
                if tot - total >= 0:        # all of stage 1 is: no more waits in this program
                    waiting = 0
                else:
                    need = gl.load(jobs_ptr + 8 * j + 5) * e1
                    while got - need < 0:
                        got = _ld_acquire(cnt_ptr + rb)
                    # the next job's count and the total, read while this job streams (acquires: they order
                    # that job's reads)
                    nrb = gl.load(jobs_ptr + 8 * j + 8, mask=j + 1 < j1, other=0)
                    got = _ld_acquire(cnt_ptr + nrb)
                    tot = _ld_acquire(cnt_ptr + NCNT)
                _asm("fence.proxy.async.global;")  # the acquires ordered before the TMA reads of h below
        row = rb * TBM
        for t in range(s0, s1):
            ac = gl.load(steps_ptr + 2 * t)
            br = gl.load(steps_ptr + 2 * t + 1)
            slot = p % NB
            mbarrier.wait(empty.index(slot), ((p // NB) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), nbytes)
            _tma_load(a_desc, [row, ac], ready.index(slot), a_bufs.index(slot))
            _tma_load(b_desc, [br, bcol], ready.index(slot), b_bufs.index(slot))
            p += 1
    if ROLE == 2:       # the last program past all its waits (all have read E) counts the call: E + 1
        left = gl.atomic_add(cnt_ptr + NCNT + 1, 1, sem="acq_rel", scope="gpu")
        if left == gl.num_programs(0) - 1:
            gl.store(cnt_ptr + NCNT + 1, 0)
            gl.store(cnt_ptr + NCNT + 2, e1)


@gluon.jit
def _consumer(c_desc, bias_ptr, jobs_ptr, jptr_ptr, cnt_ptr, NCNT, N_OUT, a_bufs, b_bufs, ready, empty, c_smem,
              HALF: gl.constexpr, HAS_BIAS: gl.constexpr, ROLE: gl.constexpr, num_warps: gl.constexpr):
    """Rows HALF·CBM .. (HALF + 1)·CBM − 1 of every job's tile. ROLE 1 (stage 1 of a dependent pair): each
    stored tile is published on its row block's counter, under the next job's first MMA (or at the end)."""
    NB: gl.constexpr = a_bufs.shape[0]
    TBM: gl.constexpr = a_bufs.shape[1]
    CBM: gl.constexpr = c_smem.shape[0]
    TBN: gl.constexpr = c_smem.shape[1]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, TBN, 16])
    pid = gl.program_id(0)
    j0 = gl.load(jptr_ptr + pid)
    j1 = gl.load(jptr_ptr + pid + 1)
    c = 0
    pend = -1                       # ROLE 1: counter of a stored, not yet published tile
    for j in range(j0, j1):
        rb = gl.load(jobs_ptr + 8 * j)
        s0 = gl.load(jobs_ptr + 8 * j + 1)
        s1 = gl.load(jobs_ptr + 8 * j + 2)
        ocol = gl.load(jobs_ptr + 8 * j + 4)
        if HAS_BIAS:        # in flight during the k-loop
            cn = ocol + gl.arange(0, TBN, layout=gl.SliceLayout(0, acc_layout))
            bvec = gl.load(bias_ptr + cn, mask=cn < N_OUT, other=0.0).to(gl.float32)
        acc = gl.zeros((CBM, TBN), gl.float32, acc_layout)
        for t in range(s0, s1):
            slot = c % NB
            mbarrier.wait(ready.index(slot), (c // NB) & 1)
            acc = warpgroup_mma(a_bufs.index(slot).slice(HALF * CBM, CBM, dim=0), b_bufs.index(slot), acc,
                                is_async=True)
            if ROLE == 1:
                if pend >= 0:       # the previous tile's store has completed under this job's first MMAs
                    if t - s0 == PUB_AT:
                        _publish(cnt_ptr, pend, NCNT)
                        pend = -1
            acc = warpgroup_mma_wait(1, deps=(acc,))
            # the previous step's MMA is complete: its slot may be refilled (it needs both consumers' arrivals)
            mbarrier.arrive(empty.index((c + NB - 1) % NB), pred=t > s0)
            c += 1
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index((c + NB - 1) % NB), pred=s1 > s0)
        if HAS_BIAS:
            acc = acc + gl.expand_dims(bvec, 0)
        if ROLE == 1:
            if pend >= 0:                   # a job of PUB_AT steps or fewer
                _publish(cnt_ptr, pend, NCNT)
                pend = -1
        tma.store_wait(pendings=0)          # the previous job's store has read c_smem
        c_smem.store(acc.to(c_smem.dtype))
        fence_async_shared()
        _tma_store(c_desc, [rb * TBM + HALF * CBM, ocol], c_smem)
        if ROLE == 1:
            pend = gl.load(jobs_ptr + 8 * j + 5)
    if ROLE == 1:
        if pend >= 0:
            _publish(cnt_ptr, pend, NCNT)
    tma.store_wait(pendings=0)


@gluon.jit
def _gws_kernel(a_desc, b_desc, c_desc, bias_ptr, jobs_ptr, jptr_ptr, steps_ptr, cnt_ptr, NCNT, N_OUT,
                HAS_BIAS: gl.constexpr, NBUF: gl.constexpr, ROLE: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = a_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [NBUF] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [NBUF] + b_desc.block_type.shape, b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NBUF):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    c0 = gl.allocate_shared_memory(dtype, c_desc.block_type.shape, c_desc.layout)
    c1 = gl.allocate_shared_memory(dtype, c_desc.block_type.shape, c_desc.layout)
    gl.warp_specialize([
        (_consumer, (c_desc, bias_ptr, jobs_ptr, jptr_ptr, cnt_ptr, NCNT, N_OUT, a_bufs, b_bufs, ready, empty, c0, 0,
                     HAS_BIAS, ROLE, num_warps)),
        (_consumer, (c_desc, bias_ptr, jobs_ptr, jptr_ptr, cnt_ptr, NCNT, N_OUT, a_bufs, b_bufs, ready, empty, c1, 1,
                     HAS_BIAS, ROLE, num_warps)),
        (_producer, (a_desc, b_desc, jobs_ptr, jptr_ptr, steps_ptr, cnt_ptr, NCNT, a_bufs, b_bufs, ready, empty, ROLE)),
    ], [num_warps, 1], [232, 40])


_GL = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def _desc(t: torch.Tensor, block: list[int]):
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, _GL[t.dtype]))


def inline_jobs(jobs: torch.Tensor, sptr: torch.Tensor) -> torch.Tensor:
    """(J, 4) `_gblr_ws` jobs (row block, step list, B column, output column) → (J, 8) rows with the step
    range inline (one table read per job instead of two dependent ones), padded to 32 bytes."""
    j = jobs.long()
    out = torch.zeros(j.shape[0], 8, dtype=torch.int32, device=jobs.device)
    out[:, 0] = jobs[:, 0]
    out[:, 1] = sptr[j[:, 1]]
    out[:, 2] = sptr[j[:, 1] + 1]
    out[:, 3] = jobs[:, 2]
    out[:, 4] = jobs[:, 3]
    return out


def stage(a, b, c, bias, jobs8, jptr, steps, BM: int, BN: int, BK: int, n_out: int, nbuf: int = 3,
          nprog: int | None = None, cnt: torch.Tensor | None = None, role: int = 0):
    """One stage: every job's tile of c = Σ over its steps of an (BM × BK) tile of a times a (BK × BN) tile of b
    (+ bias), one program per SM. a, b, c: fp16/bf16 with 16-byte aligned rows; BM even.

    A dependent pair (stage 1 with role 1, then stage 2 with role 2 on the same int32 counters `cnt`: one per
    stage-2 row block, the total, programs done, calls done; all zero at first): stage 1 publishes each stored
    half-tile on counter jobs8[j, 5] and the total; stage 2 is a programmatic dependent launch whose programs
    start as stage 1's leave their SMs, and in call E + 1 a job waits for (E + 1)·jobs8[j, 5] publications
    on its row block's counter, none once the total reaches (E + 1)·jobs8[j, 6]; its last program to finish
    counts the call."""
    if nprog is None:
        nprog = sm_count(a.device, 4)
    _gws_kernel[(nprog,)](_desc(a, [BM, BK]), _desc(b, [BK, BN]), _desc(c, [BM // 2, BN]),
                          bias if bias is not None else c, jobs8, jptr, steps, cnt if cnt is not None else jptr,
                          0 if cnt is None else cnt.numel() - 3, n_out, HAS_BIAS=bias is not None, NBUF=nbuf,
                          ROLE=role, num_warps=4, **({"launch_pdl": True} if role == 2 else {}))
    return c

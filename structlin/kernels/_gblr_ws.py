"""Persistent, warp-specialised Triton kernel of one GBLR stage (see `structlin.kernels.gblr`).

One program per SM walks a host-made list of jobs; a job is one (BM × BN) output tile, the sum of the
(BM × BK)·(BK × BN) products of its step list. The job loop is a `tl.range(..., warp_specialize=True)`:
on Hopper Triton splits the loop into a producer warp that issues the TMA loads of the *next* job's steps
while the consumer warpgroups finish the current job (its MMAs and its epilogue, a TMA store), so the short
jobs of a block structure do not each pay a pipeline fill. Imported lazily (Triton is optional). On a CUDA
device where Triton has Gluon's Hopper API, the same plans run on the Gluon stage kernel of `_gblr_gws`
(explicit partitions, 2–4% faster on the Llama shapes; config "GLUON": False keeps this kernel), which falls
back to this one, with a warning, if it does not compile.

Tables (int32, runtime arguments — one binary per dtype and tile configuration serves every layer):
  jobs   (J, 4): row block, step list, B column, output column of every job;
  jptr   (P + 1,): program p runs jobs jptr[p] .. jptr[p+1]−1 (in that order);
  sptr   (L + 1,): step list l is steps sptr[l] .. sptr[l+1]−1;
  steps  (S, 2): A column and B row of every step (B column = the job's).
"""
from __future__ import annotations

import heapq
import warnings

import torch
import triton
import triton.language as tl

from structlin.kernels import sm_count


@triton.jit
def _ws_stage_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, jobs_ptr, jptr_ptr, sptr_ptr, steps_ptr,
                     M, KA, RB, NB, N_OUT, sam, sbr, scm,
                     HAS_BIAS: tl.constexpr, WS: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # device-side descriptors: Triton's Hopper warp specialisation splits the tiles between two consumer
    # warpgroups and re-blocks the descriptors, which it can only do for descriptors made in the kernel
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, KA], strides=[sam, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[RB, NB], strides=[sbr, 1], block_shape=[BK, BN])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N_OUT], strides=[scm, 1], block_shape=[BM, BN])
    pid = tl.program_id(0)
    j0 = tl.load(jptr_ptr + pid)
    j1 = tl.load(jptr_ptr + pid + 1)
    for j in tl.range(j0, j1, warp_specialize=WS):
        rb = tl.load(jobs_ptr + 4 * j)
        lst = tl.load(jobs_ptr + 4 * j + 1)
        bcol = tl.load(jobs_ptr + 4 * j + 2)
        ocol = tl.load(jobs_ptr + 4 * j + 3)
        s0 = tl.load(sptr_ptr + lst)
        s1 = tl.load(sptr_ptr + lst + 1)
        row = rb * BM
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t in range(s0, s1):
            ac = tl.load(steps_ptr + 2 * t)
            br = tl.load(steps_ptr + 2 * t + 1)
            a = a_desc.load([row, ac])
            b = b_desc.load([br, bcol])
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            cn = ocol + tl.arange(0, BN)
            acc += tl.load(bias_ptr + cn, mask=cn < N_OUT, other=0.0).to(tl.float32)[None, :]
        c_desc.store([row, ocol], acc.to(c_desc.dtype))


PLANS = 16     # job plans kept per layer (one per distinct row-block count of M; a few ms of host work each)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _ensure_allocator():
    """Device-side tensor descriptors need global scratch (128 bytes per program) from Triton's allocator: set
    one unless the caller has (Triton keeps it in a context variable, so this runs on every call)."""
    try:
        from triton.runtime import _allocation as A
        unset = A._allocator.get() is A._NULL_ALLOCATOR
    except (ImportError, AttributeError):   # another Triton layout: set ours (it serves any caller's kernels too)
        unset = True
    if unset:
        triton.set_allocator(_scratch)


def step_lists(tabs: dict, tile: int, rank: int, kp: int, BK: int):
    """(sptr1, steps1, sptr2, steps2) as python lists: stage 1 has one step list per component (its input
    tiles, cyclic over kp columns), stage 2 one per output tile (the s/BK steps of every covering entry)."""
    def build(ptr, acol, brow, depth, wrap):
        sptr, steps = [0], []
        for b in range(len(ptr) - 1):
            for e in range(ptr[b], ptr[b + 1]):
                for kk in range(0, depth, BK):
                    c = acol[e] + kk
                    steps += [c - wrap if wrap and c >= wrap else c, brow[e] + kk]
            sptr.append(len(steps) // 2)
        return sptr, steps
    g = {k: v.tolist() for k, v in tabs.items()}
    return (*build(g["ptr1"], g["acol1"], g["brow1"], tile, kp), *build(g["ptr2"], g["acol2"], g["brow2"], rank, 0))


def schedule(lengths: list[int], rows: list[int], nprog: int, group: int, overhead: float = 2.0,
             ready: list[float] | None = None, starts: list[float] | None = None):
    """Greedy list scheduling of jobs onto `nprog` programs: jobs ordered by row-block group (so the
    programs in flight share rows of A in L2), longest first within a group; each goes to the program free
    first. With `ready` (per row block: when its inputs are there) and `starts` (per program, ascending: when
    it starts), the groups go in order of their last row block's ready time and no job starts before its own
    row block's. Returns (order of jobs per program, flattened; jptr; simulated makespan / mean load; simulated
    end time of every program; of every row block's last job)."""
    if ready is None:
        order = sorted(range(len(lengths)), key=lambda j: (rows[j] // group, -lengths[j]))
    else:   # groups of row blocks in order of their last one's ready time
        gr = {}
        for r, v in enumerate(ready):
            gr[r // group] = max(gr.get(r // group, v), v)
        order = sorted(range(len(lengths)), key=lambda j: (gr[rows[j] // group], rows[j] // group, -lengths[j]))
    heap = [(0.0 if starts is None else float(starts[p]), p) for p in range(nprog)]
    heapq.heapify(heap)
    per = [[] for _ in range(nprog)]
    done: dict = {}
    for j in order:
        t, p = heapq.heappop(heap)
        per[p].append(j)
        end = (t if ready is None else max(t, ready[rows[j]])) + lengths[j] + overhead
        done[rows[j]] = max(done.get(rows[j], 0.0), end)
        heapq.heappush(heap, (end, p))
    ends = [0.0] * nprog
    for t, p in heap:
        ends[p] = t
    flat, jptr = [], [0]
    for p in range(nprog):
        flat += per[p]
        jptr.append(len(flat))
    busy = [e - (0.0 if starts is None else starts[p]) for p, e in enumerate(ends)]
    mean = sum(busy) / nprog
    return flat, jptr, (max(ends) / mean if mean else 1.0), ends, done


def _pow2_dividing(n: int, cap: int) -> int:
    p = 16
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def supported(tile: int, rank: int) -> bool:
    """Tile shapes this kernel can take: the output tile a power of two in [16, 256] (it is stage 2's BN),
    the rank a power of two ≥ 16 or a multiple of 256 (stage 1's BN = min(256, s) divides it)."""
    pow2 = lambda v: v >= 16 and v & (v - 1) == 0
    return pow2(tile) and tile <= 256 and (pow2(rank) or rank % 256 == 0)


def ws_config(M: int, tile: int, rank: int) -> dict:
    """Tiles: stage 1 128 × min(256, s) (one job covers a component's whole rank), stage 2 256 × the output
    tile (BN = tile ≤ 256), BK 64; 4 warps per partition (Triton's Hopper warp specialisation makes a
    producer warp and two consumer warpgroups of them); 3 load stages; row-block groups of 16 × 128 rows.
    GLUON: on a CUDA device run the same jobs with the Gluon stage kernel (`_gblr_gws`, explicit partitions)
    where Triton has Gluon's Hopper API; False forces the Triton kernel. PDL (Gluon only): stage 2 is a
    dependent launch that starts on the SMs stage 1 leaves and waits per row block (`dependent_plan`), where
    the schedule simulation says it is not slower than two launches ("always": regardless; False: never)."""
    return {"BM1": 128, "BN1": min(256, rank), "BM2": 256 if tile <= 128 else 128, "BN2": tile,
            "BK": min(_pow2_dividing(tile, 64), _pow2_dividing(rank, 64)),
            "num_warps": 4, "num_stages": 3, "G": 16, "WS": True, "GLUON": True, "PDL": True}


def _jobs(M, BM, BN, sptr, ocols, nsub):
    jobs, lens, rows = [], [], []
    for rb in range(triton.cdiv(M, BM)):
        for lst in range(len(sptr) - 1):
            for sub in range(nsub):
                jobs.append((rb, lst, sub * BN, ocols[lst] + sub * BN))
                lens.append(sptr[lst + 1] - sptr[lst])
                rows.append(rb)
    return jobs, lens, rows


def _plan(M, tabs, tile, rank, kp, cfg, nprog, device):
    """Job tables and per-program job lists of both stages (cached per layer and M by the caller). On CUDA
    where the Gluon kernel runs, its tables ("inline"); with cfg PDL (and stage 2's row blocks whole
    multiples of stage 1's) stage 2 is planned as a dependent launch: its program i starts where stage 1's
    i-th program to finish leaves its SM (simulated), its jobs in order of their row block's readiness."""
    BM1, BN1, BM2, BN2, BK = cfg["BM1"], cfg["BN1"], cfg["BM2"], cfg["BN2"], cfg["BK"]
    sp1, st1, sp2, st2 = step_lists(tabs, tile, rank, kp, BK)
    t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
    stages, sims = [], []
    for BM, BN, sptr, ocols, nsub in ((BM1, BN1, sp1, [k * rank for k in range(len(sp1) - 1)], rank // BN1),
                                      (BM2, BN2, sp2, [j * tile for j in range(len(sp2) - 1)], 1)):
        jobs, lens, rows = _jobs(M, BM, BN, sptr, ocols, nsub)
        order, jptr, bal, ends, done = schedule(lens, rows, nprog, max(1, cfg["G"] * 128 // BM))
        stages.append((t([jobs[j] for j in order]).reshape(-1, 4), t(jptr), bal))
        sims.append((jobs, lens, rows, ends, done))
    lists = (t(sp1), t(st1), t(sp2), t(st2))
    ent = {"stages": stages, "lists": lists}
    gws = gluon_stage() if device.type == "cuda" else None
    if gws is None:
        return ent
    inline = [(gws.inline_jobs(jobs, sp), jptr) for (jobs, jptr, _), sp in zip(stages, lists[::2])]
    (_, _, rows1, ends1, done1), (jobs2, lens2, rows2, ends2, _) = sims
    if cfg.get("PDL") and cfg.get("GLUON", True) and BM2 % BM1 == 0:
        order2, jptr2, need, span = dependent_plan(rows1, ends1, done1, lens2, rows2, BM2 // BM1,
                                                   triton.cdiv(M, BM2), nprog, gws.PUBLISHERS,
                                                   group=max(1, cfg["G"] * 128 // BM2))
        # the pair where it is not slower (simulated) than two launches, the second starting a launch latency
        # after the first's last program ends
        if span <= max(ends1, default=0.0) + LATENCY + max(ends2, default=0.0) or cfg["PDL"] == "always":
            i1 = inline[0][0]
            i1[:, 5] = stages[0][0][:, 0] // (BM2 // BM1)     # stage 1 publishes on its stage-2 row block
            j2 = t([jobs2[j] for j in order2]).reshape(-1, 4)
            i2 = gws.inline_jobs(j2, lists[2])
            i2[:, 5] = t(need)[j2[:, 0].long()]
            i2[:, 6] = sum(need)
            inline[1] = (i2, t(jptr2))
            # one count per stage-2 row block, the total, programs done, calls done (`_gblr_gws.stage`)
            ent["cnt"] = torch.zeros(len(need) + 3, dtype=torch.int32, device=device)
    ent["inline"] = inline
    return ent


LATENCY = 2.0       # steps from a program's end to the next launch's program on its SM (simulated)


def dependent_plan(rows1, ends1, done1, lens2, rows2, ratio: int, nrb2: int, nprog: int, publishers: int,
                   publish: float = 1.0, latency: float = LATENCY, group: int = 1):
    """Stage 2 as a dependent launch (steps as the time unit, as in `schedule`): its program i starts
    `latency` after stage 1's i-th program to finish (the block scheduler hands a left SM to the next waiting
    program in order), and a job no earlier than its row block's stage-1 tiles (row blocks ratio·q ..
    ratio·q + ratio − 1 of stage 1) are published, `publish` after the last one's end. Returns (stage-2 job
    order; jptr; publications each stage-2 row block waits for; simulated end of the pair)."""
    ready = [max((done1[b] for b in range(q * ratio, (q + 1) * ratio) if b in done1), default=0.0) + publish
             for q in range(nrb2)]
    order, jptr, _, ends, _ = schedule(lens2, rows2, nprog, group, ready=ready,
                                       starts=[e + latency for e in sorted(ends1)])
    need = [0] * nrb2
    for rb in rows1:
        need[rb // ratio] += publishers
    return order, jptr, need, max(ends, default=0.0)


def gluon_stage():
    """The Gluon stage kernel module (`_gblr_gws`), or None where Triton has no Gluon Hopper API."""
    global _GWS
    if _GWS is False:
        try:
            from structlin.kernels import _gblr_gws
            _GWS = _gblr_gws
        except (ImportError, AttributeError):
            _GWS = None
    return _GWS


_GWS = False


def gblr_forward_ws(x, w_in, w_out, tabs: dict, tile: int, rank: int, n_out: int, bias=None, config=None,
                    cache: dict | None = None, nprog: int | None = None):
    """Both stages of an exported layer as two persistent launches (h rounded to x's dtype in between)."""
    M, K = x.shape
    T, S = tile, rank
    y = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    cfg = dict(ws_config(M, T, S))
    cfg.update(config or {})
    if S % cfg["BN1"] or T % cfg["BK"] or S % cfg["BK"] or cfg["BN2"] != T:
        raise ValueError(f"gblr_forward_ws: tiles {cfg} do not fit tile {T} / rank {S}")
    if nprog is None:
        nprog = sm_count(x.device, 4)
    kp = triton.cdiv(K, T) * T
    # the plan depends on M only through the row-block counts: one plan serves every M of the same blocks
    # (not per stream: CUDA-graph capture runs on a side stream and must find the plan warmed up outside it; so
    # one layer must not run on two streams at the same time — a dependent pair's counters serve one call)
    key = ("ws", triton.cdiv(M, cfg["BM1"]), triton.cdiv(M, cfg["BM2"]), nprog, repr(sorted(cfg.items())), x.device)
    ent = None if cache is None else cache.pop(key, None)
    if ent is None:
        ent = _plan(M, tabs, T, S, kp, cfg, nprog, x.device)
    if cache is not None:           # most recently used last; at most PLANS ws plans per layer
        cache[key] = ent
        old = [k for k in cache if isinstance(k, tuple) and k and k[0] == "ws"]
        for k in old[:max(0, len(old) - PLANS)]:
            del cache[k]
    (j1, p1, _), (j2, p2, _) = ent["stages"]
    sp1, st1, sp2, st2 = ent["lists"]
    HC = (tabs["ptr1"].numel() - 1) * S
    x = x.contiguous()
    h = torch.empty(M, HC, dtype=x.dtype, device=x.device)
    BM1, BN1, BM2, BN2, BK = cfg["BM1"], cfg["BN1"], cfg["BM2"], cfg["BN2"], cfg["BK"]
    gws = gluon_stage() if cfg["GLUON"] and "inline" in ent and x.dtype != torch.float32 else None
    if gws is not None:
        ((i1, q1), (i2, q2)), ns, cnt = ent["inline"], cfg["num_stages"], ent.get("cnt")
        try:
            gws.stage(x, w_in, h, None, i1, q1, st1, BM1, BN1, BK, HC, ns, nprog, cnt, 0 if cnt is None else 1)
            return gws.stage(h, w_out, y, bias, i2, q2, st2, BM2, BN2, BK, n_out, ns, nprog, cnt,
                             0 if cnt is None else 2)
        except BaseException as e:  # a Triton whose Gluon API differs: say so once, then the Triton kernel
            if cnt is not None:     # stage 1 may have run without stage 2: start the counts afresh
                cnt.zero_()
            if not isinstance(e, Exception):
                raise
            global _GWS
            _GWS = None
            warnings.warn(f"gblr: the Gluon stage kernel does not compile with Triton {triton.__version__} "
                          f"({type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}); using the Triton "
                          "kernel (pass config={'GLUON': False} to skip the attempt)", RuntimeWarning, stacklevel=3)
    kw = dict(WS=bool(cfg["WS"]), IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"],
              num_stages=cfg["num_stages"])
    _ensure_allocator()
    _ws_stage_kernel[(nprog,)](x, w_in, h, h, j1, p1, sp1, st1, M, K, w_in.shape[0], S, HC,
                               x.stride(0), w_in.stride(0), h.stride(0),
                               HAS_BIAS=False, BM=BM1, BN=BN1, BK=BK, **kw)
    _ws_stage_kernel[(nprog,)](h, w_out, y, bias if bias is not None else y, j2, p2, sp2, st2,
                               M, HC, w_out.shape[0], T, n_out, h.stride(0), w_out.stride(0), y.stride(0),
                               HAS_BIAS=bias is not None, BM=BM2, BN=BN2, BK=BK, **kw)
    return y

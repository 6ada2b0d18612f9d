"""Readable tables for bench_speed's results (the same numbers as its JSON)."""

from __future__ import annotations

from benchmarks.measure import table

KINDS = ("linear", "attention", "norm", "elementwise")


def _f(v, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def _pct(part, whole) -> str:
    return "-" if part is None or not whole else f"{100 * part / whole:.0f}%"


def _transformer_tables(meta: dict, rs: list[dict]) -> list[str]:
    def sides(r):
        return r["ours"], r.get("diffusers", {})

    rows = []
    for r in rs:
        o, d = sides(r)
        rows.append([f"{r['size']}px", _f(o["step_s"]), _f(d.get("step_s")), _f(r.get("ratio"), ".2f"),
                     _f(o.get("step_24_s")), _f(d.get("step_24_s")), _f(r.get("ratio_24"), ".2f"),
                     _f(o["first_step_s"]), _f(r.get("max_abs_err_over_std"), ".1e")])  # fmt: skip
    out = [
        table(
            f"Transformer step, batch 2 (CFG), {rs[0]['context_tokens']} context tokens: seconds "
            f"(measured at depth {meta['depth']}; '24' = 24 blocks extrapolated by block kind)",
            ["size", "ours", "diffusers", "ours/diff", "ours 24", "diff 24", "ours/diff 24", "ours 1st", "err/std"],
            rows,
        )
    ]
    rows = []
    for r in rs:
        o, d = sides(r)
        dw, dk = d.get("weights_gib"), d.get("work_gib")
        gib = [o["weights_gib"], o["work_gib"], o["peak_gib"], dw, dk, None if dw is None or dk is None else dw + dk]
        rows.append([f"{r['size']}px", *(_f(v, ".2f") for v in gib)])
    method = rs[0].get("diffusers", {}).get("peak_method", "n/a")
    out.append(
        table(
            f"Transformer step memory, GiB (ours: {rs[0]['ours']['peak_method']}; diffusers: {method}; "
            "work = peak above what was allocated before the step)",
            ["size", "ours weights", "ours work", "ours peak", "diff weights", "diff work", "diff weights+work"],
            rows,
        )
    )
    rows = []
    for r in rs:
        ob, db, kb = r["ours"]["block_s"], r.get("diffusers", {}).get("block_s", {}), r["kernels"]["block_sum_s"]
        for k in ob:
            diff = _f(ob[k] / db[k] if db.get(k) else None, ".2f")
            rows.append([f"{r['size']}px", k, _f(ob[k]), _f(db.get(k)), diff, _f(kb[k]), _f(ob[k] / kb[k], ".2f")])
    out.append(
        table(
            "One block, seconds (dual = MMDiT-X with attn2, blocks 0-12; plain = 13-22; "
            "pre_only = 23, context-pre-only)",
            ["size", "block", "ours", "diffusers", "ours/diff", "sum of kernels", "ours/kernels"],
            rows,
        )
    )
    rows = []
    for r in rs:
        step, k = r["ours"]["step_s"], r["kernels"]["by_kind_s"]
        d = r.get("diffusers", {})
        dk, dstep = d.get("by_kind_s", {}), d.get("profiled_step_s")
        d_rest = None
        if dk:
            d_rest = sum(v for kind, v in dk.items() if kind not in KINDS)
            d_rest += max(dstep - sum(dk.values()), 0.0)
        for kind in KINDS:
            rows.append(
                [f"{r['size']}px", kind, _f(k[kind]), _pct(k[kind], step), _f(dk.get(kind)), _pct(dk.get(kind), dstep)]
            )
        glue = step - r["kernels"]["sum_s"]
        rows.append([f"{r['size']}px", "glue / other", _f(glue), _pct(glue, step), _f(d_rest), _pct(d_rest, dstep)])
    out.append(
        table(
            f"Step by kind of work at depth {meta['depth']}, seconds (ours: kernels timed alone at the step's shapes, "
            "glue = real step - their sum; diffusers: torch.profiler self times of a profiled step, "
            "adaLN/embedder linears included, other = copies, python, untracked)",
            ["size", "kind", "ours", "% ours step", "diffusers", "% diff step"],
            rows,
        )
    )
    rows = [
        [f"{r['size']}px", _f(r["ours"]["step_s"]), _f(r["kernels"]["sum_s"]), _f(r["efficiency"], ".3f"),
         _f(r["ours"].get("step_24_s")), _f(r["kernels"]["sum_24_s"]), _f(r.get("efficiency_24"), ".3f")]
        for r in rs
    ]  # fmt: skip
    out.append(
        table(
            "Backend efficiency: real step / sum of the kernels its math requires (target <= 1.10)",
            ["size", "real step", "sum of kernels", "ratio", "real 24", "kernels 24", "ratio 24"],
            rows,
        )
    )
    for r in rs:
        rows = [
            [t["kernel"], t["kind"], t["count"], _f(t["each_ms"], ".4g"), _f(t["total_s"]),
             _pct(t["total_s"], r["kernels"]["sum_s"])]
            for t in r["kernels"]["table"][:12]
        ]  # fmt: skip
        out.append(
            table(
                f"Largest kernels at {r['size']}px, depth {meta['depth']} "
                "(shapes: batch, tokens, in, out / batch, heads, L, d)",
                ["kernel", "kind", "count", "each ms", "total s", "% of sum"],
                rows,
            )
        )
    return out


def _once_rows(r: dict, extra: list) -> list:
    o, d = r["ours"], r.get("diffusers", {})
    runs = f"{o['runs']}{'' if o['warm'] else ' cold'}"
    gib = [_f(v, ".2f") for v in (o["peak_gib"], o["work_gib"], d.get("work_gib"))]
    return [
        _f(o["s"]),
        _f(d.get("s")),
        _f(r.get("ratio"), ".2f"),
        *extra,
        *gib,
        _f(r.get("max_abs_err_over_std"), ".1e"),
        runs,
    ]


def print_report(results: dict) -> None:
    m = results["meta"]
    blas = f"OpenBLAS {m['openblas']}" if m["openblas"] else "no OpenBLAS"
    torch_line = "diffusers skipped"
    if "torch" in m:
        where = "with" if m["torch_process_openblas"] else "without"
        torch_line = (
            f"torch {m['torch']} on {m['torch_device']}, {m['torch_threads']} threads, in a process {where} "
            "the system OpenBLAS"
        )
    lines = [
        f"# sd35m-mlx speed, {m['date']}: {m['platform']}",
        f"# mlx {m['mlx']} on {m['mlx_device']} ({blas}); {torch_line}; {m['dtype']}",
        f"# transformer: SD3.5 Medium width, random weights, depth {m['depth']} of 24 "
        f"(dual-attention blocks {m['dual_attention_layers']}, last block context-pre-only)",
    ]
    if m.get("load_average_at_start"):
        load = ", ".join(f"{x:.1f}" for x in m["load_average_at_start"])
        lines.append(
            f"# {m['cpu_count']} CPUs; load average at start {load} (other work on the machine slows both sides)"
        )
    if m["openblas_env"]:
        lines.append(f"# WARNING {m['openblas_env']} set: benchmark with env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE")
    if "transformer" in results:
        lines += _transformer_tables(m, results["transformer"])
    for name in ("text", "vae"):
        if "error" in results.get(name, {}):
            lines.append(f"\n## {name}: failed: {results[name]['error']}")
    if "text" in results and "error" not in results["text"]:
        r = results["text"]
        o, d = r["ours"], r.get("diffusers", {})
        what = f"full CLIP-L + CLIP-G, T5-XXL width with {r['t5_layers']} layers" if r["full_size"] else "tiny fixture"
        lines.append(
            table(
                f"Prompt encoding, prompt + negative, T5 {r['max_sequence_length']} tokens ({what}), seconds, GiB",
                ["ours", "diffusers", "ours/diff", "ours T5", "diff T5", "ours T5x24", "diff T5x24",
                 "ours/diff T5x24", "ours peak", "ours work", "diff work", "err/std", "runs"],
                [_once_rows(r, [_f(o["t5_s"]), _f(d.get("t5_s")), _f(o.get("s_t5_24")), _f(d.get("s_t5_24")),
                                _f(r.get("ratio_t5_24"), ".2f")])],
            )
        )  # fmt: skip
    if "vae" in results and "error" not in results["vae"]:
        r = results["vae"]
        what = "SD3 VAE, full size" if r["full_size"] else "tiny fixture VAE"
        lines.append(
            table(
                f"VAE decode {r['size']}x{r['size']} ({what}), seconds, GiB",
                ["ours", "diffusers", "ours/diff", "ours peak", "ours work", "diff work", "err/std", "runs"],
                [_once_rows(r, [])],
            )
        )
    print("\n".join(lines), flush=True)

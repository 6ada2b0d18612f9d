"""bench_memory.py's derivation and report: full-size weights from shapes, stage peaks per configuration,
full-size load ratios, checks and verdict, and the tables printed from them (GB = 1e9 bytes).

Runs in the main process on the workers' measurements; the full-size modules are lazy (shapes only,
nothing is allocated).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from benchmarks.measure import lazy_quantize, mlx_param_bytes, table

GB = 1e9
TARGET_GB = 3.5  # issue 16: 1024 px on an 8 GB Mac (was 6 GB)
LOAD_TARGET = 1.15
CLIP_TOKENS = 77
FULL_DEPTH = {"transformer": 24, "t5": 24}  # SD3.5 Medium blocks, T5-XXL layers
EVALUATE_MODES = {
    "first use": "the rest evaluated by a first forward (2 tokens), as the pipeline does",
    "mx.eval": "the rest evaluated at once: mx.eval(model.parameters())",
}
REAL_FILE = {"transformer": "bf16", "t5": "f16"}  # how the published checkpoint stores them


def load_job_name(kind: str, unit: str, n: int, file: str, bits: int | None, mode: str) -> str:
    return f"load {kind} {unit}{n} {file} file -> {bits or 16} bit, {mode}"


def quantized_bytes(module) -> int:
    """Bytes of the module's quantized layers."""
    return sum(mlx_param_bytes(m) for _, m in module.named_modules() if isinstance(m, nn.QuantizedLinear))


def modulation_bytes(model) -> int:
    """Bytes of the adaLN and conditioning-embedder weights (what low_memory releases after the modulations)."""
    names = ["time_text_embed", "norm_out"]
    total = sum(mlx_param_bytes(model[n]) for n in names if n in model)
    for block in model.transformer_blocks:
        total += sum(mlx_param_bytes(block[n]) for n in ("norm1", "norm1_context") if n in block)
    return total


# ---------------------------------------------------------------------------------------------
# Full-size accounting (main process; lazy modules: shapes only, nothing is allocated)


def full_size_accounting(group_size: int, steps: int, batch: int = 2, ctx_len: int = 333, size: int = 1024) -> dict:
    from scripts.build_fixture import CLIP_G_FULL  # (imports torch: here, not in the measuring workers)
    from sd35m_mlx.models.clip import CLIPTextConfig, CLIPTextModel
    from sd35m_mlx.models.mmdit import MMDiTConfig, SD3Transformer2DModel
    from sd35m_mlx.models.t5 import T5Config, T5EncoderModel
    from sd35m_mlx.models.vae import AutoencoderKL, VAEConfig

    def bf16(model):
        model.set_dtype(mx.bfloat16)
        return model

    out: dict = {"transformer": {}, "t5": {}}
    for variant, bits in (("bf16", None), ("q8", 8), ("q4", 4)):
        tr = lazy_quantize(bf16(SD3Transformer2DModel(MMDiTConfig())), bits, group_size)
        out["transformer"][variant] = dict(
            total=mlx_param_bytes(tr),
            modulation_weights=modulation_bytes(tr),
            quantized_layers=quantized_bytes(tr),
            pos_embed=tr.pos_embed.pos_embed.size * 2,
        )
        t5 = lazy_quantize(bf16(T5EncoderModel(T5Config())), bits, group_size)
        out["t5"][variant] = dict(total=mlx_param_bytes(t5), quantized_layers=quantized_bytes(t5))
    out["clip_l"] = mlx_param_bytes(bf16(CLIPTextModel(CLIPTextConfig())))
    out["clip_g"] = mlx_param_bytes(bf16(CLIPTextModel(CLIPTextConfig(**CLIP_G_FULL))))
    out["vae"] = mlx_param_bytes(bf16(AutoencoderKL(VAEConfig())))
    # adaLN outputs for the whole schedule (GuidedDenoiser keeps them), bfloat16, and the embedded context
    tr = SD3Transformer2DModel(MMDiTConfig())
    chunks = sum(b.norm1.num_chunks + b.norm1_context.num_chunks for b in tr.transformer_blocks)
    chunks += tr.norm_out.num_chunks
    dim = tr.config.hidden_size
    out["modulations"] = chunks * dim * batch * steps * 2
    # prompt embeddings (cond + uncond, 333 x 4096), embedded context, pooled, latents, noise, velocity
    lat = size // 8
    out["inputs"] = 2 * ctx_len * 4096 * batch + 2 * ctx_len * dim * batch + 3 * 4 * lat * lat * 16 * batch
    return out


# ---------------------------------------------------------------------------------------------
# Derivation and report


@dataclass(frozen=True)
class Config:
    name: str
    transformer: str  # bf16 | q8 | q4
    t5: str | None  # None: no T5
    staged: bool


CONFIGS = [
    Config("(a) bfloat16", "bf16", "bf16", False),
    Config("(a) bfloat16, staged", "bf16", "bf16", True),
    Config("(b) T5 4 bit + MMDiT 8 bit, staged", "q8", "q4", True),
    Config("(b) T5 4 bit + MMDiT 8 bit, not staged", "q8", "q4", False),
    Config("(c) no T5", "bf16", None, False),
    Config("(c) no T5, staged", "bf16", None, True),
]


def activations(measured: dict[str, dict | None], args) -> dict:
    """The measured activation work of each stage (bfloat16), with where each figure comes from."""
    d1 = min(args.depths)
    t_lo = min(args.t5_layers)
    acts: dict = {"sources": {}}

    def pick(key, value, source):
        acts[key] = value
        acts["sources"][key] = source

    r = measured.get(f"text bf16 t5 l{t_lo}")
    if r:
        pick("text_t5", r["work"], f"measured: bfloat16, full CLIP-L/G + T5-XXL width {t_lo} layer(s)")
    r = measured.get("text bf16 no t5")
    if r:
        pick("text_no_t5", r["work"], "measured: bfloat16, full CLIP-L/G, T5 zeros")
    for attention, label in (("fused", "Metal"), ("cpu", "CPU")):
        r = measured.get(f"denoise bf16 {attention} d{d1}")
        f32 = measured.get(f"denoise f32 {attention} d{d1}")
        if r:
            pick(f"step_{label}", r["step"]["work"], f"measured: bfloat16 step, depth {d1}, {attention} attention")
            pick("init_transient", max(r["init_transient"], 0), "measured: bfloat16 GuidedDenoiser set-up")
        elif f32:  # an upper bound: the bfloat16 step measured 0.71x the float32 one at 1440 px, not 0.5x
            pick(f"step_{label}", f32["step"]["work"], f"upper bound: the float32 step, depth {d1}, {attention}")
            acts.setdefault("init_transient", max(f32["init_transient"], 0))
    r = measured.get("vae bf16")
    if r:
        pick("vae", r["work"], f"measured: bfloat16 decode at {args.vae_size} px")
    r = measured.get("vae tiled bf16")
    if r:
        pick("vae_tiled", r["work"], f"measured: bfloat16 tiled decode (512 px tiles) at {args.vae_size} px")
    return acts


def derive(acc: dict, acts: dict, args) -> list[dict]:
    """Stage peaks of the full-size pipeline per configuration (steady state: a new prompt on a pipeline
    that has generated before, so the VAE weights are resident; low_memory has released the text
    encoders after encoding and the transformer after denoising, and reloads them when needed)."""
    rows = []
    vae, clip = acc["vae"], acc["clip_l"] + acc["clip_g"]
    mods, inputs = acc["modulations"], acc["inputs"]
    for c in CONFIGS:
        tr = acc["transformer"][c.transformer]
        t5 = acc["t5"][c.t5]["total"] if c.t5 else 0
        everything = tr["total"] + t5 + clip + vae
        text_work = acts.get("text_t5" if c.t5 else "text_no_t5")
        stage_res = {
            # resident weights in the stage, and what they are
            # low_memory runs T5 alone, then both CLIPs, reading each for its turn and releasing it after
            "text": (max(t5, clip) + vae, "T5 or CLIP-L + CLIP-G (one at a time) + VAE")
            if c.staged
            else (everything, "all weights"),
            # GuidedDenoiser set-up: the whole transformer (a quantized reload evaluates every quantized layer)
            "denoise set-up": (tr["total"] + vae, "transformer + VAE") if c.staged else (everything, "all weights"),
            # low_memory drops the adaLN/embedder weights once the modulations are computed
            "denoise step": (tr["total"] - tr["modulation_weights"] + vae, "transformer - adaLN + VAE")
            if c.staged
            else (everything, "all weights"),
            "VAE decode": (vae, "VAE") if c.staged else (everything, "all weights"),
        }
        works = {
            "text": (text_work, text_work),
            "denoise set-up": (acts.get("init_transient"), acts.get("init_transient")),
            "denoise step": (acts.get("step_Metal"), acts.get("step_CPU")),
            # low_memory decodes in tiles (sd35m_mlx/vae_tiling.py)
            "VAE decode": (acts.get("vae_tiled"),) * 2 if c.staged and "vae_tiled" in acts else (acts.get("vae"),) * 2,
        }
        extra = {"text": inputs, "denoise set-up": mods + inputs, "denoise step": mods + inputs, "VAE decode": inputs}
        for stage, (res, what) in stage_res.items():
            metal, cpu = works[stage]
            row = dict(
                config=c.name,
                stage=stage,
                resident=res,
                resident_what=what,
                extra=extra[stage],
                work_metal=metal,
                work_cpu=cpu,
                peak_metal=None if metal is None else res + extra[stage] + metal,
                peak_cpu=None if cpu is None else res + extra[stage] + cpu,
            )
            rows.append(row)
    return rows


def _phase_end_full(phase: str, acc_entry: dict) -> int:
    """Full-size bytes resident at the end of a load phase."""
    return acc_entry["quantized_layers"] if phase == "quantize_model" else acc_entry["total"]


def load_report(measured: dict[str, dict | None], acc: dict, args) -> list[dict]:
    """Measured load ratios, and the full-size ratio derived phase by phase: the transient of a phase
    (its peak above what stays resident after it) is added to the full-size bytes resident after that
    phase; a transient that grows with depth is extrapolated linearly to 24 blocks/layers."""
    rows = []
    for kind, unit, sizes in (("transformer", "d", args.load_depths), ("t5", "l", args.t5_layers)):
        for file, (variant, bits), mode in itertools.product(
            ("f32", REAL_FILE[kind]), (("bf16", None), ("q8", 8), ("q4", 4)), EVALUATE_MODES
        ):
            runs = [(n, measured.get(load_job_name(kind, unit, n, file, bits, mode))) for n in sizes]
            runs = [(n, r) for n, r in runs if r]
            if not runs:
                continue
            full_peak, full_excess, grows_any = 0, 0, False
            for i, ph in enumerate(runs[-1][1]["phases"]):
                transients = [(n, r["phases"][i]["peak"] - r["phases"][i]["end"]) for n, r in runs]
                (n0, e0), (n1, e1) = transients[0], transients[-1]
                grows = n1 > n0 and e1 > 1.05 * e0 + 0.01 * GB
                excess = (
                    e1 + (FULL_DEPTH[kind] - n1) * (e1 - e0) / (n1 - n0) if grows else max(e for _, e in transients)
                )
                end = _phase_end_full(ph["phase"], acc[kind][variant])
                if end + excess > full_peak:
                    full_peak, full_excess, grows_any = end + excess, excess, grows
            full = acc[kind][variant]["total"]
            for n, r in runs:
                rows.append(
                    dict(
                        component=kind,
                        file=file,
                        variant=variant,
                        evaluate=mode,
                        depth=n,
                        loaded=r["loaded"],
                        peak=r["peak"],
                        ratio=r["ratio"],
                        excess=r["excess"],
                        rss_peak=r["rss_peak"],
                        seconds=r["seconds"],
                        full_size=full,
                        full_size_excess=full_peak - full,
                        phase_transient=full_excess,
                        excess_grows=grows_any,
                        full_size_ratio=full_peak / full,
                    )
                )
    return rows


def _gb(x) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def print_report(results: dict) -> None:
    meta, m = results["meta"], results["measured"]
    print(f"\n# {meta['platform']} | mlx {meta['mlx']} | {meta['device']} | sizes: {meta['sizes']}")
    if load_rows := results["load"]:
        groups: dict = {}
        for r in load_rows:
            groups.setdefault((r["component"], r["file"], r["variant"], r["evaluate"]), []).append(r)
        rows = []
        for (component, file, variant, mode), rs in groups.items():
            last = rs[-1]
            ok = "ok" if last["full_size_ratio"] <= LOAD_TARGET else "OVER"
            grows = ", grows: extrapolated" if last["excess_grows"] else ""
            cells = lambda key, fmt, rs=rs: " / ".join(fmt(r[key]) for r in rs)  # noqa: E731
            rows.append([f"{component} ({file} -> {variant})", mode, cells("depth", str), cells("loaded", _gb),
                         cells("ratio", lambda x: f"{x:.2f}"), cells("excess", _gb), cells("rss_peak", _gb),
                         f"{_gb(last['full_size'])}, {_gb(last['full_size_excess'])}{grows}, "
                         f"{last['full_size_ratio']:.2f} {ok}"])  # fmt: skip
        print(table("1. Streaming load (loaded as bfloat16; quantized as quantize_model streams it)",
                    ["component (file -> loaded)", "rest evaluated", "depth/layers", "loaded GB", "peak/loaded",
                     "excess GB", "RSS peak GB", "full size: GB, excess GB, peak/loaded"], rows))  # fmt: skip
        for mode, what in EVALUATE_MODES.items():
            print(f"- {mode}: {what}")
        if p := m.get("pipeline load q8 t5q4 staged"):
            q, gb = p["quantized_layer_bytes"], {k: _gb(p[k]) for k in ("resident_after_from_pretrained", "loaded")}
            print(f"from_pretrained(quantize=8, t5_quantize=4, low_memory=True) at reduced size: resident "
                  f"right after loading {gb['resident_after_from_pretrained']} GB = quantized layers of the "
                  f"transformer {_gb(q.get('transformer'))} GB + T5 {_gb(q.get('text_encoder_3'))} GB "
                  f"(evaluated by quantize_model; the rest stays lazy); everything evaluated: {gb['loaded']} GB,"
                  f" peak/loaded {p['ratio']:.3f}. Process RSS before loading (interpreter, MLX, sd35m_mlx): "
                  f"{_gb(p['rss_process_before_load'])} GB.")  # fmt: skip
        if p := m.get("pipeline load bf16"):
            print(f"from_pretrained(float32 files, 'bfloat16') at reduced size (the pipeline fixture: full "
                  f"CLIP-L/G and VAE, reduced T5 and MMDiT depth): loaded {_gb(p['loaded'])} GB, peak during "
                  f"from_pretrained {_gb(p['after_from_pretrained']['peak'])} GB, peak/loaded "
                  f"{p['ratio']:.3f} (target {LOAD_TARGET}).")  # fmt: skip
        if qc := m.get("qcheck"):
            mb = {k: f"{qc[k] / 1e6:.2f} MB" for k in ("bfloat16", "8 bit", "4 bit", "output_bytes")}
            print(f"QuantizedLinear check (16 x 4096 -> 10240, bfloat16 activations): work of one call: "
                  f"Linear {mb['bfloat16']}, 8 bit {mb['8 bit']}, 4 bit {mb['4 bit']} "
                  f"(output {mb['output_bytes']})")  # fmt: skip

    rows = []
    for name, r in m.items():
        if r is not None and name.startswith("denoise"):
            w = r["step"]
            rss = None if w["rss_peak"] is None else w["rss_peak"] - w["rss_before"]
            rows.append(
                [f"{name} (step)", r["depth"], _gb(w["work"]), _gb(rss), _gb(r["weights"]), f"{w['seconds']:.0f}"]
            )
            adaln = f"{_gb(r['modulation_weights'])} adaLN, {_gb(r['released'])} released"
            rows.append([f"{name} (set-up: transient)", r["depth"], _gb(r["init_transient"]), "-", adaln,
                         f"{r['init']['seconds']:.1f}"])  # fmt: skip
        elif r is not None and name.startswith(("text", "vae")):
            rss = None if r["rss_peak"] is None else r["rss_peak"] - r["rss_before"]
            rows.append([name, r.get("t5_layers", "-"), _gb(r["work"]), _gb(rss), _gb(r["weights"]),
                         f"{r['seconds']:.0f}"])  # fmt: skip
    print(table("2a. Activation work measured (peak above what was allocated before; full width)",
                ["measurement", "depth/layers", "work GB", "RSS peak - before GB", "weights GB", "s"],
                rows))  # fmt: skip
    for check in results["checks"]:
        print(f"- {check}")

    acc = results["full_size"]
    tr, t5 = acc["transformer"], acc["t5"]
    adaln = " / ".join(_gb(tr[v]["modulation_weights"]) for v in ("bf16", "q8", "q4"))
    rows = [["MMDiT", *(_gb(tr[v]["total"]) for v in ("bf16", "q8", "q4")), adaln],
            ["T5-XXL", *(_gb(t5[v]["total"]) for v in ("bf16", "q8", "q4")), ""],
            ["CLIP-L + CLIP-G", _gb(acc["clip_l"] + acc["clip_g"]), "", "", ""],
            ["VAE", _gb(acc["vae"]), "", "", ""]]  # fmt: skip
    print(table(f"2b. Full-size weights (bfloat16; quantized per sd35m_mlx.quantize's plan, group size "
                f"{meta['group_size']}), GB", ["component", "bf16", "8 bit", "4 bit",
                "adaLN + conditioning embedders (bf16 / 8 / 4 bit)"], rows))  # fmt: skip
    print(f"adaLN modulations for {meta['steps']} steps at batch 2: {_gb(acc['modulations'])} GB; "
          f"prompt embeddings, latents and other inputs: {_gb(acc['inputs'])} GB")  # fmt: skip

    rows = [[r["config"], r["stage"], _gb(r["resident"]), r["resident_what"], _gb(r["extra"]), _gb(r["work_metal"]),
             _gb(r["peak_metal"]), _gb(r["peak_cpu"])] for r in results["stages"]]  # fmt: skip
    print(table(f"2c. Peak per stage, full SD3.5 Medium, {meta['size']}x{meta['size']}, batch 2, {meta['ctx_len']} "
                "tokens (derived: resident + inputs + measured work), GB", ["configuration", "stage",
                "resident weights", "what", "+ inputs, modulations", "+ work (Metal)", "peak, Metal",
                "peak, this CPU"], rows))  # fmt: skip
    print("\nPeak of each configuration (max over stages):\n")
    for name, v in results["config_peaks"].items():
        print(f"- {name}: Metal {_gb(v['metal'])} GB, this CPU {_gb(v['cpu'])} GB")
    print("\n## 3. Verdict\n")
    for line in results["verdict"]:
        print(f"- {line}")


def checks_and_verdict(results: dict, measured: dict[str, dict | None], args) -> tuple[list[str], list[str]]:
    checks, verdict = [], []
    depths = sorted(set(args.depths))
    works = [(d, measured.get(f"denoise f32 fused d{d}")) for d in depths]
    works = [(d, r["step"]["work"]) for d, r in works if r]
    if len(works) > 1:
        (d0, w0), (dn, wn) = works[0], works[-1]
        growth = (wn - w0) / (dn - d0)
        checks.append(
            "depth check (float32 step, fused attention): work "
            + ", ".join(f"depth {d} {_gb(w)} GB" for d, w in works)
            + f"; {growth / GB:+.3f} GB per block -> 24 blocks would add {23 * growth / GB:+.2f} GB "
            + ("(not added: within 5%)" if abs(wn - w0) <= 0.05 * w0 else "(NOT constant: see extrapolation)")
        )
        if abs(wn - w0) > 0.05 * w0:
            results["step_growth_per_block"] = growth
    t = [(n, measured.get(f"text f32 t5 l{n}")) for n in sorted(set(args.t5_layers))]
    t = [(n, r["work"]) for n, r in t if r]
    if len(t) > 1:
        layers = ", ".join(f"{n} layer(s) {_gb(w)} GB" for n, w in t)
        checks.append(f"T5 layer check (float32 text encoding): work {layers}")
    for attention in ("cpu", "fused"):
        b, f = (
            measured.get(f"denoise bf16 {attention} d{depths[0]}"),
            measured.get(f"denoise f32 {attention} d{depths[0]}"),
        )
        if b and f:
            ratio = b["step"]["work"] / f["step"]["work"]
            checks.append(f"bfloat16 / float32 step work ({attention} attention, depth {depths[0]}): {ratio:.3f}")

    peaks = results["config_peaks"]
    b_staged = peaks.get("(b) T5 4 bit + MMDiT 8 bit, staged")
    if b_staged and b_staged["metal"] is not None:
        ok = b_staged["metal"] <= TARGET_GB * GB
        worst = max((r for r in results["stages"] if r["config"].startswith("(b)") and "not staged" not in r["config"]),
                    key=lambda r: r["peak_metal"] or 0)  # fmt: skip
        verdict.append(
            f"Target (quantized staged <= {TARGET_GB:g} GB, Metal): {'HOLDS' if ok else 'MISSED'}: peak "
            f"{_gb(b_staged['metal'])} GB in stage '{worst['stage']}' "
            f"({_gb(worst['resident'])} GB weights: {worst['resident_what']})."
        )
        if b_staged["cpu"] is not None:
            verdict.append(f"On this CPU backend (attention scores materialised): {_gb(b_staged['cpu'])} GB.")
    tr = results["full_size"]["transformer"]
    verdict.append(
        "adaLN + conditioning-embedder weights released by low_memory after the modulations are computed: "
        f"bf16 {_gb(tr['bf16']['modulation_weights'])} GB, MMDiT 8 bit {_gb(tr['q8']['modulation_weights'])} GB, "
        f"4 bit {_gb(tr['q4']['modulation_weights'])} GB (already subtracted in the staged 'denoise step' rows)."
    )
    load = results["load"]
    for file_kind, label in (("f32", "float32 files"), ("real", "files as published (bf16 MMDiT, fp16 T5)")):
        rows = [r for r in load if (r["file"] == "f32") == (file_kind == "f32")]
        if not rows:
            continue
        worst = max(rows, key=lambda r: r["full_size_ratio"])
        status = "holds" if worst["full_size_ratio"] <= LOAD_TARGET else "MISSED"
        verdict.append(
            f"Streaming load <= {LOAD_TARGET}x, {label}: {status}; worst full-size peak/loaded "
            f"{worst['full_size_ratio']:.2f} ({worst['component']} -> {worst['variant']}, rest evaluated by "
            f"'{worst['evaluate']}', excess {_gb(worst['full_size_excess'])} GB)."
        )
    return checks, verdict


def derive_results(measured: dict[str, dict | None], args, meta: dict) -> dict:
    """Everything the report prints, from the measurements: full-size accounting, activations, stage
    peaks per configuration, load ratios, checks and verdict."""
    acc = full_size_accounting(args.group_size, args.steps, ctx_len=CLIP_TOKENS + args.t5_tokens, size=args.size)
    acts = activations(measured, args)
    stages = derive(acc, acts, args)  # from_pretrained(low_memory=True) reads no transformer weight
    config_peaks = {}
    for c in CONFIGS:
        rows = [r for r in stages if r["config"] == c.name]
        config_peaks[c.name] = {
            k: (None if any(r[f"peak_{k}"] is None for r in rows) else max(r[f"peak_{k}"] for r in rows))
            for k in ("metal", "cpu")
        }
    results = dict(meta=meta, measured=measured, full_size=acc, activations=acts, load=load_report(measured, acc, args),
                   stages=stages, config_peaks=config_peaks)  # fmt: skip
    results["checks"], results["verdict"] = checks_and_verdict(results, measured, args)
    return results

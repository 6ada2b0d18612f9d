"""Output error of weight quantization, to choose which layers stay in high precision.

    python -m benchmarks.bench_quantization --depth 4 --json quantization.json

Relative RMSE of one forward against float32 (MMDiT at full width, reduced depth, 512 px; T5 at XXL width,
fewer layers; random weights) for every Linear quantized, sd35m_mlx's policy, the alternatives it was
chosen against and each layer group alone. The forwards run in float32 on dequantized weights (quantized
matmul is ~60x slower on MLX's CPU backend); a check compares that emulation with the real QuantizedLinear
model. Method and figures: benchmarks/README.md ("Figures behind library choices").
"""

from __future__ import annotations

import sys
import tempfile
import time
from fnmatch import fnmatchcase
from pathlib import Path

# Run as a file, the script's own folder heads sys.path, where sibling modules (measure.py, ...) would
# shadow installed packages of the same name: put the repository root there instead.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import sd35m_mlx  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from benchmarks.measure import machine, parser, write_json  # noqa: E402
from scripts.build_fixture import build_full_width_transformer, build_t5  # noqa: E402
from sd35m_mlx.loading.text_encoders import load_t5_encoder  # noqa: E402
from sd35m_mlx.loading.transformer import load_transformer  # noqa: E402
from sd35m_mlx.quantize import (  # noqa: E402
    EVERY_LINEAR,
    T5_POLICY,
    TRANSFORMER_POLICY,
    LayerPolicy,
    quantization_plan,
    quantize_model,
)

GROUPS = {
    "transformer": {
        "embedders": ("time_text_embed.*", "context_embedder"),
        "adaLN": TRANSFORMER_POLICY.at_least_8_bits,
        "attention": ("*.attn.*", "*.attn2.*"),
        "mlp": ("*.ff.*", "*.ff_context.*"),
        "proj_out": ("proj_out",),
    },
    "t5": {
        "attention q,k,v": ("*.SelfAttention.q", "*.SelfAttention.k", "*.SelfAttention.v"),
        "attention o": ("*.SelfAttention.o",),
        "ffn wi_0,wi_1": ("*.wi_0", "*.wi_1"),
        "ffn wo": ("*.wo",),
    },
}
# the policies compared: sd35m_mlx's and the alternatives it was chosen against
POLICIES = {
    "transformer": {
        "every Linear": EVERY_LINEAR,
        "policy": TRANSFORMER_POLICY,
        "policy, adaLN at N bits too": LayerPolicy(keep=TRANSFORMER_POLICY.keep),
        "policy, adaLN kept": LayerPolicy(keep=TRANSFORMER_POLICY.keep + TRANSFORMER_POLICY.at_least_8_bits),
    },
    "t5": {"every Linear = policy": T5_POLICY},
}


def rel_rmse(out: mx.array, ref: mx.array) -> float:
    out, ref = out.astype(mx.float32), ref.astype(mx.float32)
    return float(mx.sqrt(mx.mean((out - ref) ** 2)) / mx.sqrt(mx.mean(ref**2)))


def _matches(path: str, patterns) -> bool:
    return any(fnmatchcase(path, p) for p in patterns)


def variants(model: nn.Module, component: str, bits: int, group_size: int) -> dict[str, dict[str, int]]:
    """Variant name -> {layer path: bits}."""
    out = {name: quantization_plan(model, bits, group_size, policy) for name, policy in POLICIES[component].items()}
    every = quantization_plan(model, bits, group_size, EVERY_LINEAR)
    for name, patterns in GROUPS[component].items():
        out[f"only {name}"] = {p: b for p, b in every.items() if _matches(p, patterns)}
    return out


def fake_quantize(model: nn.Module, original: dict, plan: dict[str, int], group_size: int) -> None:
    new = {}
    for p, bits in plan.items():
        w = original[f"{p}.weight"]
        new[f"{p}.weight"] = mx.dequantize(*mx.quantize(w, group_size, bits), group_size=group_size, bits=bits)
    model.load_weights(list({**original, **new}.items()))


def linear_params(model: nn.Module, paths) -> int:
    params = dict(tree_flatten(model.parameters()))
    return sum(params[f"{p}.weight"].size for p in paths)


def measure(model, component, forward, group_size, bits_list) -> list[dict]:
    original = dict(tree_flatten(model.parameters()))
    ref = forward()
    mx.eval(ref)
    total = linear_params(model, quantization_plan(model, 8, 1, EVERY_LINEAR))
    # reference: every weight (not only the linears) rounded to bfloat16, computed in float32
    model.load_weights([(k, v.astype(mx.bfloat16).astype(mx.float32)) for k, v in original.items()])
    reference = dict(component=component, variant="bfloat16 weights", rel_rmse=rel_rmse(forward(), ref))
    print(f"{component:11s} every weight rounded to bfloat16: rel RMSE {reference['rel_rmse']:.2e}", flush=True)
    rows = [reference]
    for bits in bits_list:
        for name, plan in variants(model, component, bits, group_size).items():
            t0 = time.perf_counter()
            fake_quantize(model, original, plan, group_size)
            err = rel_rmse(forward(), ref)
            n = linear_params(model, plan)
            rows.append(
                dict(component=component, bits=bits, variant=name, rel_rmse=err, layers=len(plan),
                     quantized_params=n, share_of_linear_params=n / total)
            )  # fmt: skip
            print(
                f"{component:11s} {bits} bit  {name:28s} rel RMSE {err:.2e}  ({len(plan):3d} layers, "
                f"{100 * n / total:5.1f}% of linear weights)  [{time.perf_counter() - t0:.1f}s]",
                flush=True,
            )
    model.load_weights(list(original.items()))
    return rows


# ---------------------------------------------------------------------------------------------


def transformer_bench(args) -> tuple[list[dict], dict]:
    k1, k2, k3 = mx.random.split(mx.random.key(0), 3)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = build_full_width_transformer(Path(tmp) / "transformer", depth=args.depth)
        print(f"# built depth-{args.depth} full-width transformer in {time.perf_counter() - t0:.0f}s", flush=True)
        model = load_transformer(folder, mx.float32)
        mx.eval(model.parameters())
        cfg = model.config

        def inputs(lat, ctx_len):
            x = mx.random.normal((1, lat, lat, cfg.in_channels), key=k1)
            ctx = mx.random.normal((1, ctx_len, cfg.joint_attention_dim), key=k2)
            pooled = mx.random.normal((1, cfg.pooled_projection_dim), key=k3)
            return x, ctx, pooled, mx.array([args.timestep])

        big = inputs(args.latent, 333)
        rows = measure(model, "transformer", lambda: model(*big), args.group_size, args.bits)

        # emulation check: the real QuantizedLinear model against the dequantized-weights forward
        small = inputs(args.check_latent, 77)
        original = dict(tree_flatten(model.parameters()))
        ref = model(*small)
        checks = []
        for bits in args.bits:
            fake_quantize(model, original, quantization_plan(model, bits, args.group_size), args.group_size)
            emulated = model(*small)
            mx.eval(ref, emulated)
            real = quantize_model(load_transformer(folder, mx.float32), bits, args.group_size)
            t0 = time.perf_counter()
            out = real(*small)
            mx.eval(out)
            check = dict(
                component="transformer",
                bits=bits,
                latent=args.check_latent,
                real_vs_emulated_rel_rmse=rel_rmse(out, emulated),
                real_vs_f32_rel_rmse=rel_rmse(out, ref),
                quantized_forward_s=time.perf_counter() - t0,
            )
            checks.append(check)
            print(
                f"# check {bits} bit, {args.check_latent}x{args.check_latent} latent: QuantizedLinear vs "
                f"emulation {check['real_vs_emulated_rel_rmse']:.1e}, vs float32 {check['real_vs_f32_rel_rmse']:.2e}",
                flush=True,
            )
            del real
    return rows, {"checks": checks}


def t5_bench(args) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        model = load_t5_encoder(build_t5(Path(tmp) / "t5", args.t5_layers), mx.float32)
        mx.eval(model.parameters())
    ids = mx.random.randint(0, model.config.vocab_size, (1, 256), key=mx.random.key(1))
    return measure(model, "t5", lambda: model(ids), args.group_size, args.bits), {}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--depth", type=int, default=4, help="MMDiT blocks (real: 24)")
    p.add_argument("--latent", type=int, default=64, help="latent side (64: 512x512 px)")
    p.add_argument("--check-latent", type=int, default=16, help="latent side of the QuantizedLinear check")
    p.add_argument("--timestep", type=float, default=500.0)
    p.add_argument("--t5-layers", type=int, default=2, help="T5 layers (real: 24)")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--skip", choices=("transformer", "t5"), default=None)
    args = p.parse_args()

    print(f"# {machine()}", flush=True)
    rows, extra = [], {}
    if args.skip != "transformer":
        r, extra["transformer"] = transformer_bench(args)
        rows += r
    if args.skip != "t5":
        r, extra["t5"] = t5_bench(args)
        rows += r

    print("\n| component | variant | 8 bit rel RMSE | 4 bit rel RMSE | share of linear weights |")
    print("|---|---|---|---|---|")
    for comp in ("transformer", "t5"):
        names = dict.fromkeys(r["variant"] for r in rows if r["component"] == comp and "bits" in r)
        for name in names:
            by_bits = {r["bits"]: r for r in rows if r["component"] == comp and r["variant"] == name}
            cells = [f"{by_bits[b]['rel_rmse']:.2e}" if b in by_bits else "-" for b in (8, 4)]
            share = next(iter(by_bits.values()))["share_of_linear_params"]
            print(f"| {comp} | {name} | {cells[0]} | {cells[1]} | {100 * share:.1f}% |")
    for r in rows:
        if "bits" not in r:
            print(f"# {r['component']}: every weight rounded to bfloat16 (reference): rel RMSE {r['rel_rmse']:.2e}")
    write_json(args.json, {"args": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows, **extra})


if __name__ == "__main__":
    main()

"""Gradient checkpointing by stages: the loss and LoRA gradients with one transformer block's activations
alive at a time, whatever the size.

`mx.checkpoint` around each block (lora_params.checkpoint_blocks) leaves the order of the recomputations
to MLX's scheduler, which evaluates the whole step as one graph: at 1024 px it still held about one
attention matrix per block (tens of GB at 24 blocks; benchmarks/README.md). Here the step
is cut where the memory is: the forward runs stage by stage and keeps only each block's inputs
(evaluated, so no graph hangs on them); the backward then walks the stages in reverse, each a
`mx.vjp` of that stage alone (its forward recomputed), evaluated before the next. Stages: the inputs
(patch tokens, embedded context and every block's adaLN modulations), each block, and the output head
with the loss. The arithmetic is the monolithic step's; only the grouping of evaluations differs.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .lora_params import TrainableLora
from .recipe import Recipe, noised, prediction_loss

_BLOCK_MODULATION = ("norm1.linear", "norm1_context.linear")  # run by the inputs stage, not the block


def stage_of(path: str) -> str | int:
    """Which stage uses the LoRA layer at `path`: a block index, "output" or "inputs"."""
    if path.startswith("transformer_blocks."):
        _, index, inner = path.split(".", 2)
        return "inputs" if inner in _BLOCK_MODULATION else int(index)
    return "output" if path.split(".")[0] == "proj_out" else "inputs"


class _Stage:
    """One stage's function of (its LoRA factors, its array inputs) -> list of arrays, as a vjp-able function
    of a flat argument list."""

    def __init__(self, lora: TrainableLora, params: dict, fn):
        self.lora, self.fn = lora, fn
        self.keys = [(path, name) for path in params for name in sorted(params[path])]
        self.flat = [params[path][name] for path, name in self.keys]

    def _call(self, *args):
        k = len(self.flat)
        p: dict = {}
        for (path, name), a in zip(self.keys, args[:k], strict=True):
            p.setdefault(path, {})[name] = a
        self.lora.bind(p)
        return self.fn(*args[k:])

    def forward(self, inputs: list) -> list:
        return self._call(*self.flat, *inputs)

    def backward(self, inputs: list, cotangents: list) -> tuple[list, dict, list]:
        """(outputs, gradients of its LoRA factors, gradients of `inputs`), evaluated."""
        outputs, grads = mx.vjp(self._call, [*self.flat, *inputs], cotangents)
        k = len(self.flat)
        g: dict = {}
        for (path, name), a in zip(self.keys, grads[:k], strict=True):
            g.setdefault(path, {})[name] = a
        mx.eval(outputs, g, grads[k:])
        return outputs, g, grads[k:]


def staged_loss_and_grads(
    lora: TrainableLora,
    transformer: nn.Module,
    latents: mx.array,
    prompt_embeds: mx.array,
    pooled_prompt_embeds: mx.array,
    noise: mx.array,
    sigmas: mx.array,
    timesteps: mx.array,
    recipe: Recipe,
) -> tuple[mx.array, dict]:
    """(loss, d loss / d LoRA params) as `step.loss_and_grads` computes them, evaluated stage by stage."""
    blocks = transformer.transformer_blocks
    by_stage: dict = {}
    for path, factors in lora.params.items():
        by_stage.setdefault(stage_of(path), {})[path] = factors
    b, height, width = latents.shape[:3]
    x_t = noised(latents, noise, sigmas)
    mod_keys: list[str] = []

    def inputs_fn():
        context, modulations = transformer.embed_conditions(prompt_embeds, pooled_prompt_embeds, timesteps, b)
        flat = tree_flatten(modulations)
        mod_keys[:] = [k for k, _ in flat]
        return [transformer.pos_embed(x_t), context, *[a for _, a in flat]]

    def block_fn(block, keys):
        def run(x, context, *mods):
            x, new_context = block(x, context, tree_unflatten(list(zip(keys, mods, strict=True))))
            return [x] if new_context is None else [x, new_context]

        return run

    def output_fn(x, *modulation):
        pred = transformer.output(x, modulation, height, width)
        return [prediction_loss(pred, x_t, latents, noise, sigmas, recipe)]

    # 1. Forward, stage by stage: keep each block's inputs, evaluated, and nothing else
    inputs = _Stage(lora, by_stage.get("inputs", {}), inputs_fn)
    out = inputs.forward([])
    mx.eval(out)
    x, context = out[0], out[1]
    modulations = tree_unflatten(list(zip(mod_keys, out[2:], strict=True)))
    stages, stage_inputs, n_out = [], [], []
    for i, block in enumerate(blocks):
        flat = tree_flatten(modulations[i])
        stages.append(_Stage(lora, by_stage.get(i, {}), block_fn(block, [k for k, _ in flat])))
        stage_inputs.append([x, context, *[a for _, a in flat]])
        y = stages[-1].forward(stage_inputs[-1])
        mx.eval(y)
        n_out.append(len(y))
        x, context = y[0], (y[1] if len(y) > 1 else None)

    # 2. Backward, in reverse: the output head with the loss, each block, then the inputs stage
    head = _Stage(lora, by_stage.get("output", {}), output_fn)
    (loss,), grads, (ct_x, *ct_final) = head.backward([x, *modulations[-1]], [mx.array(1.0, mx.float32)])
    ct_context, ct_mods = None, [None] * len(blocks)
    for i in reversed(range(len(blocks))):
        if n_out[i] == 1:  # context-pre-only (the last block): no context out
            cts = [ct_x]
        else:
            cts = [ct_x, mx.zeros_like(stage_inputs[i][1]) if ct_context is None else ct_context]
        _, g, (ct_x, ct_context, *ct_mods[i]) = stages[i].backward(stage_inputs[i], cts)
        grads.update(g)
        stage_inputs[i] = None
    if by_stage.get("inputs"):
        _, g, _ = inputs.backward([], [ct_x, ct_context, *[c for m in ct_mods for c in m], *ct_final])
        grads.update(g)
    lora.bind(lora.params)
    return loss, grads

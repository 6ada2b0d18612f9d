"""Settings from a ComfyUI PNG: its API-format `prompt` chunk (node id -> {"class_type", "inputs"}).

ComfyUI saves the graph it ran in two chunks, `workflow` (the editor's layout) and `prompt` (what its
executor ran); the latter names every input by the node classes of comfy/nodes.py and comfy_extras/
(ComfyUI commit a125cd84b054a57729b5eecab930ca9408719832): KSampler (seed, steps, cfg, sampler_name,
scheduler, denoise), KSamplerAdvanced (noise_seed, ...), CLIPTextEncode (text), CLIPTextEncodeSD3 (clip_l,
clip_g, t5xxl), ModelSamplingSD3 (shift), EmptySD3LatentImage (width, height, batch_size),
SkipLayerGuidanceSD3 (layers, scale, start_percent, end_percent). ComfyUI draws its initial noise on the
CPU from torch's generator, so the seed replays with rng "cpu", and its prompts with text encoding "comfyui"
(T5's length, ComfyUI's weight syntax). What we cannot apply is named in a note.
"""

from __future__ import annotations

import json

PROMPT_KEY = "prompt"  # ComfyUI's API-format graph
_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
_MAX_NODES = 10_000


def comfyui_graph(text: str) -> dict | None:
    """The API-format graph in a `prompt` chunk, or None when the chunk is not one."""
    try:
        graph = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(graph, dict) or not graph or len(graph) > _MAX_NODES:
        return None
    if not all(isinstance(n, dict) and isinstance(n.get("inputs", {}), dict) for n in graph.values()):
        return None
    return graph if any(n.get("class_type") in _SAMPLER_NODES for n in graph.values()) else None


def _linked(graph: dict, value) -> dict | None:
    """The node an input links to ([node id, output index]), or None."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))):
        return None
    node = graph.get(str(value[0]))
    return node if isinstance(node, dict) else None


def _prompt_text(graph: dict, link, seen: frozenset = frozenset()) -> str | None:
    """The text of the conditioning an input links to: CLIPTextEncode's text, CLIPTextEncodeSD3's t5xxl
    (else clip_g, else clip_l); other conditioning nodes are followed through their first conditioning input."""
    node = _linked(graph, link)
    if node is None or str(link[0]) in seen or len(seen) > 64:  # a cycle, or a chain too long to be a prompt's
        return None
    inputs = node.get("inputs", {})
    kind = node.get("class_type")
    if kind == "CLIPTextEncode":
        return inputs.get("text") if isinstance(inputs.get("text"), str) else None
    if kind == "CLIPTextEncodeSD3":
        texts = [inputs.get(k) for k in ("t5xxl", "clip_g", "clip_l")]
        return next((t for t in texts if isinstance(t, str) and t), "")
    for name in ("conditioning", "conditioning_1", "positive"):
        if name in inputs:
            return _prompt_text(graph, inputs[name], seen | {str(link[0])})
    return None


def parse_comfyui(graph: dict) -> tuple[dict, list[str]]:
    """(raw Settings fields, notes on what cannot be applied) from an API-format graph."""
    notes: list[str] = []
    nodes = list(graph.values())
    samplers = [n for n in nodes if n.get("class_type") in _SAMPLER_NODES]
    if len(samplers) > 1:
        notes.append(f"the graph has {len(samplers)} sampler nodes; read the first")
    node = samplers[0]
    inputs = node["inputs"]
    # ComfyUI's text encoding and weight syntax (sd35m_mlx/prompts/comfyui.py); its noise: torch's CPU generator
    raw: dict = {"rng": "cpu", "slg": False, "text_encoding": "comfyui", "prompt_syntax": "weighted"}
    advanced = node["class_type"] == "KSamplerAdvanced"
    seed = inputs.get("noise_seed" if advanced else "seed")
    for name, value in (("seed", seed), ("steps", inputs.get("steps")), ("cfg", inputs.get("cfg"))):
        if value is not None and not isinstance(value, list):
            raw[name] = value
    for name in ("sampler_name", "scheduler"):
        if isinstance(inputs.get(name), str):
            raw[name.removesuffix("_name")] = inputs[name]
    denoise = inputs.get("denoise", 1.0)
    if denoise != 1.0:
        notes.append(f"denoise {denoise} (img2img from an image the PNG does not hold) is not applied")
    if advanced:
        start, end = inputs.get("start_at_step", 0), inputs.get("end_at_step", 10000)
        if start != 0 or (isinstance(end, int) and isinstance(raw.get("steps"), int) and end < raw["steps"]):
            notes.append(f"KSamplerAdvanced steps {start} to {end} (a partial run) are not applied")
        if inputs.get("add_noise", "enable") != "enable":
            notes.append("KSamplerAdvanced add_noise=disable is not applied")
    for key, field in (("positive", "prompt"), ("negative", "negative_prompt")):
        text = _prompt_text(graph, inputs.get(key))
        if text is None:
            notes.append(f"the {key} prompt is not from a text-encode node; not read")
        else:
            raw[field] = text
    for n in nodes:
        kind, ins = n.get("class_type"), n.get("inputs", {})
        if kind == "ModelSamplingSD3" and "shift" in ins:
            raw["shift"] = ins["shift"]
        elif kind in ("EmptySD3LatentImage", "EmptyLatentImage"):
            raw.update({k: ins[k] for k in ("width", "height") if k in ins})
            if ins.get("batch_size", 1) != 1:
                notes.append(f"batch_size {ins['batch_size']} is not applied (use -n/--num-images)")
        elif kind == "SkipLayerGuidanceSD3":
            raw["slg"] = True
            layers = ins.get("layers")
            if isinstance(layers, str):
                try:
                    raw["slg_layers"] = [int(x) for x in layers.replace(" ", "").split(",") if x]
                except ValueError:
                    notes.append(f"SkipLayerGuidanceSD3 layers {layers!r} are not a list of numbers")
            for src, field in (("scale", "slg_scale"), ("start_percent", "slg_start"), ("end_percent", "slg_stop")):
                if src in ins:
                    raw[field] = ins[src]
        elif kind == "CLIPTextEncodeSD3":
            texts = [ins.get(k) for k in ("clip_l", "clip_g", "t5xxl")]
            if len({t for t in texts if isinstance(t, str)}) > 1:
                notes.append("CLIPTextEncodeSD3's separate clip_l / clip_g / t5xxl texts are not applied (one text "
                             "for all three encoders)")  # fmt: skip
        elif kind == "ConditioningZeroOut":
            notes.append("ConditioningZeroOut is not applied (the prompt under it is encoded)")
        elif kind in ("LoraLoader", "LoraLoaderModelOnly"):
            notes.append(f"LoRA {ins.get('lora_name')!r} is not applied (pass it with --lora)")
    return raw, notes

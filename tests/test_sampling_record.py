"""--sampler / --scheduler / --shift / --rng on the command line, in the PNG record (A1111's labels and our
JSON), and back through --from-image: our PNGs, A1111's (old "DPM++ 2M Karras" style, fields we lack) and
ComfyUI's API-format `prompt` graph (written here by hand from ComfyUI's node classes, commit a125cd84)."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_cli import fake, invoke  # noqa: F401  (the fixture)

from sd35m_mlx.defaults import SAMPLERS
from sd35m_mlx.record import JSON_KEY, Settings, parameters_text
from sd35m_mlx_cli.main import cli


def _png(name, **chunks):
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (64, 64)).save(name, pnginfo=info)


def test_help_lists_every_sampler_scheduler_and_rng():
    out = CliRunner().invoke(cli, ["--help"], terminal_width=1000).output
    assert all(s in out for s in SAMPLERS) and "--scheduler" in out and "--shift" in out
    assert "[cpu|nv|mlx]" in out and "kl_optimal" in out


@pytest.mark.parametrize(
    "sampler, scheduler, rng, text",
    [
        ("euler_ancestral", "karras", "cpu", "Sampler: Euler a, Schedule type: Karras"),
        ("dpmpp_2m_sde", "sgm_uniform", "nv", "Sampler: DPM++ 2M SDE, Schedule type: SGM Uniform"),
        ("uni_pc", "normal", "mlx", "Sampler: UniPC, Schedule type: Normal"),
        ("res_multistep", "linear_quadratic", "cpu", "Sampler: res_multistep, Schedule type: linear_quadratic"),
    ],
)
def test_record_writes_a1111_labels_and_reads_them_back(fake, sampler, scheduler, rng, text):  # noqa: F811
    args = ("a fox", "--steps", "3", "--seed", "5", "--sampler", sampler, "--scheduler", scheduler, "--rng", rng)
    result = invoke(*args, "--shift", "2.5")
    assert result.exit_code == 0, result.output
    png = Image.open("sd35m-5.png")
    assert text in png.text["parameters"] and "Shift: 2.5" in png.text["parameters"]
    assert f"RNG: {dict(cpu='CPU', nv='NV', mlx='MLX')[rng]}" in png.text["parameters"]
    stored = json.loads(png.text[JSON_KEY])
    assert (stored["sampler"], stored["scheduler"], stored["shift"], stored["rng"]) == (sampler, scheduler, 2.5, rng)
    (call,) = fake.calls
    assert (call["sampler"], call["scheduler"], call["shift"], call["rng"]) == (sampler, scheduler, 2.5, rng)
    # the text alone (our JSON chunk broken) restores them too, with a note
    _png("text.png", parameters=png.text["parameters"], **{JSON_KEY: "{broken"})
    result = invoke("--from-image", "text.png", "-o", "again.png")
    assert result.exit_code == 0, result.output
    assert "JSON chunk is broken" in result.output
    again = fake.calls[-1]
    assert (again["sampler"], again["scheduler"], again["shift"], again["rng"]) == (sampler, scheduler, 2.5, rng)


def test_png_without_an_rng_record_replays_with_mlx(fake):  # noqa: F811
    old = Settings(prompt="a cat", steps=3, seed=4).to_json()
    for key in ("rng", "scheduler", "shift"):
        del old[key]
    _png("old.png", **{JSON_KEY: json.dumps(old)})
    assert invoke("--from-image", "old.png").exit_code == 0
    assert (fake.calls[-1]["rng"], fake.calls[-1]["scheduler"], fake.calls[-1]["seed"]) == ("mlx", "normal", 4)
    assert invoke("--from-image", "old.png", "--rng", "cpu", "-o", "b.png").exit_code == 0  # the option wins
    assert fake.calls[-1]["rng"] == "cpu"
    text = parameters_text(Settings(prompt="a cat", seed=4), "sd35m-mlx 0.0.9").replace(", RNG: CPU", "")
    _png("old-text.png", parameters=text)
    assert invoke("--from-image", "old-text.png", "-o", "c.png").exit_code == 0
    assert fake.calls[-1]["rng"] == "mlx"


def test_from_image_reads_a1111_old_style_sampler_and_notes_what_it_cannot_apply(fake):  # noqa: F811
    text = ("a tree\nNegative prompt: fog\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, "
            "Size: 512x640, Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, Model: sd3.5_medium")  # fmt: skip
    _png("a1111.png", parameters=text)
    result = invoke("--from-image", "a1111.png")
    assert result.exit_code == 0, result.output
    call = fake.calls[-1]
    assert (call["sampler"], call["scheduler"], call["rng"], call["seed"]) == ("dpmpp_2m", "karras", "nv", 123)
    notes = [line for line in result.output.splitlines() if line.startswith("Note:")]
    assert any("Clip skip '2' is not applied" in n for n in notes)
    assert any("Hires upscale" in n for n in notes) and any("Hires upscaler" in n for n in notes)
    _png("b.png", parameters=text.replace("DPM++ 2M Karras", "DPM fast") + ", Schedule type: Uniform, RNG: CPU")
    result = invoke("--from-image", "b.png", "-o", "b-out.png")
    assert result.exit_code == 0 and "Sampler 'DPM fast' is not one we run" in result.output
    call = fake.calls[-1]
    assert (call["sampler"], call["scheduler"], call["rng"]) == ("euler", "normal", "cpu")


def _comfyui_graph(**sampler_inputs):
    """An SD3.5 text-to-image graph in ComfyUI's API format, as its default SD3.5 workflow wires it."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 424242, "steps": 28, "cfg": 5.5, "sampler_name": "dpmpp_2m", "scheduler": "sgm_uniform",
            "denoise": 1.0, "model": ["13", 0], "positive": ["16", 0], "negative": ["40", 0],
            "latent_image": ["53", 0], **sampler_inputs}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_medium.safetensors"}},
        "13": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 3.5, "model": ["14", 0]}},
        "14": {"class_type": "SkipLayerGuidanceSD3", "inputs": {
            "layers": "7, 8, 9", "scale": 3.0, "start_percent": 0.01, "end_percent": 0.15, "model": ["4", 0]}},
        "16": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse, dusk", "clip": ["4", 1]}},
        "40": {"class_type": "CLIPTextEncodeSD3", "inputs": {
            "clip_l": "blurry", "clip_g": "blurry", "t5xxl": "blurry", "empty_padding": "none", "clip": ["4", 1]}},
        "53": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 832, "height": 1216, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }  # fmt: skip


def test_from_image_reads_a_comfyui_png(fake):  # noqa: F811
    _png("comfy.png", prompt=json.dumps(_comfyui_graph()), workflow="{}")
    result = invoke("--from-image", "comfy.png")
    assert result.exit_code == 0, result.output
    call = fake.calls[-1]
    want = dict(prompt="a lighthouse, dusk", negative_prompt="blurry", seed=424242, num_inference_steps=28,
                guidance_scale=5.5, sampler="dpmpp_2m", scheduler="sgm_uniform", shift=3.5, rng="cpu", width=832,
                height=1216, skip_guidance_layers=[7, 8, 9], skip_layer_guidance_scale=3.0,
                skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.15, text_encoding="comfyui",
                prompt_syntax="weighted")  # fmt: skip
    assert {k: call[k] for k in want} == want
    assert not [line for line in result.output.splitlines() if line.startswith("Note:")]


def test_text_encoding_is_an_option_recorded_and_replayed(fake):  # noqa: F811
    result = invoke("a cat", "--text-encoding", "comfyui", "-o", "c.png")
    assert result.exit_code == 0, result.output
    assert fake.calls[-1]["text_encoding"] == "comfyui"
    assert "Text encoding: comfyui" in Image.open("c.png").text["parameters"]
    assert invoke("--from-image", "c.png", "-o", "again.png").exit_code == 0
    assert fake.calls[-1]["text_encoding"] == "comfyui"
    assert invoke("a cat", "-o", "d.png").exit_code == 0
    assert fake.calls[-1]["text_encoding"] == "diffusers"
    assert "Text encoding" not in Image.open("d.png").text["parameters"]  # PNGs before the option: diffusers
    _png("a1111.png", parameters="a cat\nSteps: 20, Sampler: Euler, Seed: 1, Text encoding: comfy")
    result = invoke("--from-image", "a1111.png", "-o", "bad.png")
    assert result.exit_code == 0 and "text_encoding" in result.output, result.output
    assert fake.calls[-1]["text_encoding"] == "diffusers"
    result = invoke("a cat", "--text-encoding", "comfy")
    assert result.exit_code == 2 and "comfyui" in result.output


def test_a_comfyui_png_without_a_readable_prompt_says_why(fake):  # noqa: F811
    graph = _comfyui_graph()
    graph["16"]["inputs"]["text"] = ["16", 0]  # a cycle: the text is wired to the node itself
    graph["40"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["40", 0]}}
    _png("comfy.png", prompt=json.dumps(graph))
    result = invoke("--from-image", "comfy.png")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "comfy.png stores none" in result.stderr and "positive prompt is not from a text-encode node" in (
        result.stderr
    )
    assert fake.calls == []


def test_comfyui_png_notes_what_it_cannot_apply(fake):  # noqa: F811
    graph = _comfyui_graph(denoise=0.6, sampler_name="dpmpp_2m_sde_gpu", scheduler="AYS SD3")
    graph["53"]["inputs"]["batch_size"] = 4
    del graph["14"]
    graph["13"]["inputs"]["model"] = ["4", 0]
    _png("comfy.png", prompt=json.dumps(graph))
    result = invoke("--from-image", "comfy.png")
    assert result.exit_code == 0, result.output
    notes = "\n".join(line for line in result.output.splitlines() if line.startswith("Note:"))
    assert "denoise 0.6" in notes and "batch_size 4" in notes
    assert "dpmpp_2m_sde_gpu" in notes and "AYS SD3" in notes
    assert "CLIPTextEncodeSD3" not in notes and "ConditioningZeroOut" not in notes

    graph["40"]["inputs"].update(clip_l="", clip_g="")  # ComfyUI leaves CLIP out of this negative
    graph["41"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["40", 0]}}
    graph["3"]["inputs"]["negative"] = ["41", 0]
    _png("zero.png", prompt=json.dumps(graph))
    result = invoke("--from-image", "zero.png")
    assert result.exit_code == 0, result.output
    assert "clip_l / clip_g / t5xxl" in result.output and "ConditioningZeroOut is not applied" in result.output
    call = fake.calls[-1]
    assert (call["sampler"], call["scheduler"], call["skip_guidance_layers"]) == ("euler", "normal", None)

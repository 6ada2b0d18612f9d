"""LoraLibrary: a LoRA folder listed as A1111 lists it, metadata from the header only, no way out of the folder."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from sd35m_mlx.lora.library import LoraLibrary, read_metadata


def write_lora(path, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": np.ones((2, 4), np.float32)}, str(path), metadata=metadata)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "loras"
    write_lora(root / "style.safetensors", {"ss_output_name": "inkStyle", "modelspec.trigger_phrase": "ink, sketch"})
    write_lora(root / "chars" / "alice.safetensors", {"ss_tag_frequency": json.dumps({"img": {"alice": 3}})})
    write_lora(root / "chars" / "deep" / "Bob.SAFETENSORS")
    write_lora(root / "other" / "alice.safetensors")
    (root / "notes.txt").write_text("not a lora")
    (root / "old.ckpt").write_bytes(b"pickle")
    (root / "broken.safetensors").write_bytes(b"\x00" * 3)
    return root


def test_lists_every_safetensors_file_by_relative_name(folder):
    library = LoraLibrary(folder)
    assert library.names() == ["broken", "chars/alice", "chars/deep/Bob", "other/alice", "style"]
    entries = {e.name: e for e in library.entries()}
    assert entries["style"].alias == "inkStyle" and entries["chars/alice"].alias == "chars/alice"
    assert entries["style"].trigger_words == ["ink", "sketch"]
    assert entries["chars/alice"].metadata == {"ss_tag_frequency": {"img": {"alice": 3}}}  # JSON parsed, as A1111
    assert entries["broken"].metadata == {} and entries["chars/deep/Bob"].trigger_words == []
    assert entries["chars/alice"].path == folder.resolve() / "chars" / "alice.safetensors"


def test_metadata_comes_from_the_header_without_loading_tensors(folder, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("tensors loaded")

    monkeypatch.setattr(mx, "load", no_loading)
    monkeypatch.setattr(np, "frombuffer", no_loading)
    assert read_metadata(folder / "style.safetensors")["ss_output_name"] == "inkStyle"
    assert LoraLibrary(folder).get("style").alias == "inkStyle"


def test_refresh_sees_new_and_removed_files(folder):
    library = LoraLibrary(folder)
    write_lora(folder / "new.safetensors")
    (folder / "style.safetensors").unlink()
    library.refresh()
    assert "new" in library.names() and "style" not in library.names()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("style", "style.safetensors"),
        ("style.safetensors", "style.safetensors"),
        ("inkStyle", "style.safetensors"),  # the alias, as A1111 tags may use
        ("chars/alice", "chars/alice.safetensors"),
        ("Bob", "chars/deep/Bob.SAFETENSORS"),  # a file name that only one LoRA has
    ],
)
def test_resolves_names_to_files_in_the_folder(folder, name, expected):
    assert LoraLibrary(folder).resolve(name) == (folder / expected).resolve()


@pytest.mark.parametrize(
    "name, match",
    [
        ("alice", "ambiguous.*chars/alice, other/alice"),
        ("styel", "no LoRA named 'styel' in .*loras; did you mean style"),
        ("nothing-like-it", "no LoRA named"),
        ("../loras/style", "may not contain '..'"),
        ("chars/../style", "may not contain '..'"),
        ("./style", "may not contain"),
        ("chars//alice", "may not contain"),
        ("/etc/passwd", "is not a name in"),
        ("..\\style", "is not a name in"),
        ("C:\\loras\\style", "is not a name in"),
        ("", "is not a name in"),
        ("style\0", "is not a name in"),
    ],
)
def test_refuses_missing_and_hostile_names_in_one_line(folder, name, match):
    with pytest.raises(ValueError, match=match) as info:
        LoraLibrary(folder).resolve(name)
    assert "\n" not in str(info.value)


def test_links_out_of_the_folder_are_neither_listed_nor_resolved(folder, tmp_path):
    outside = write_lora(tmp_path / "secret" / "secret.safetensors")
    os.symlink(outside, folder / "link.safetensors")
    os.symlink(outside.parent, folder / "linked_dir")
    os.symlink(folder / "style.safetensors", folder / "alias.safetensors")  # a link inside is fine
    library = LoraLibrary(folder)
    assert "link" not in library.names() and not any(n.startswith("linked_dir") for n in library.names())
    assert library.resolve("alias") == (folder / "style.safetensors").resolve()
    for name in ("link", "linked_dir/secret", "secret"):
        with pytest.raises(ValueError):
            library.resolve(name)


def test_a_file_swapped_for_a_link_after_listing_is_refused(folder, tmp_path):
    library = LoraLibrary(folder)
    outside = write_lora(tmp_path / "elsewhere.safetensors")
    (folder / "style.safetensors").unlink()
    os.symlink(outside, folder / "style.safetensors")
    with pytest.raises(ValueError, match="outside"):
        library.resolve("style")


def test_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LoraLibrary(tmp_path / "nope")
    with pytest.raises(TypeError):
        LoraLibrary(tmp_path).resolve(3)

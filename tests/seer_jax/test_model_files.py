"""`seer_jax.model_files`: which tokenizer and generation files a model directory carries, copied whole."""

from seer_jax.model_files import copy_model_files, model_files


def test_copies_tokenizer_chat_templates_and_generation_config(tmp_path):
    source, destination = tmp_path / "source", tmp_path / "destination"
    source.mkdir()
    destination.mkdir()
    names = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "generation_config.json",
        "qwen.tiktoken",
    ]
    for name in [*names, "model.safetensors", "config.json", "notes.txt"]:
        (source / name).write_text(f"contents of {name}")
    (source / "additional_chat_templates").mkdir()
    (source / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    expected = sorted([*names, "additional_chat_templates/"])
    assert model_files(source) == expected
    assert copy_model_files(source, destination) == expected
    for name in names:
        assert (destination / name).read_text() == f"contents of {name}"
    assert (destination / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"
    assert not (destination / "model.safetensors").exists() and not (destination / "config.json").exists()
    assert copy_model_files(tmp_path / "destination" / "additional_chat_templates", tmp_path) == []

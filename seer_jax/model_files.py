"""The files a model directory carries besides config.json and the weights: the tokenizer, its chat template and
the generation config. The converter (`seer_jax.checkpoint.save_converted`) and the HF export
(`seer_jax.hf_export.save_hf`) copy them along, so a converted or exported directory loads with
`transformers.AutoTokenizer.from_pretrained` and `apply_chat_template` works as on the original.
"""

import shutil
from pathlib import Path

# Every file `transformers` tokenizers and `GenerationConfig` read from a model directory (Llama, Mistral, Qwen:
# fast tokenizer.json, sentencepiece or tiktoken models, BPE vocab/merges), and chat templates in each place
# transformers has stored them (tokenizer_config.json's "chat_template", chat_template.jinja, chat_template.json).
MODEL_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_FILE_PATTERNS = ("*.tiktoken",)
# transformers saves named chat templates beyond the default one here, one .jinja file each.
MODEL_DIRS = ("additional_chat_templates",)


def model_files(directory: str | Path) -> list[str]:
    """The names of `directory`'s tokenizer and generation files (see `MODEL_FILES`), sorted; directories end in "/"."""
    directory = Path(directory)
    names = {name for name in MODEL_FILES if (directory / name).is_file()}
    names |= {path.name for pattern in MODEL_FILE_PATTERNS for path in directory.glob(pattern) if path.is_file()}
    names |= {f"{name}/" for name in MODEL_DIRS if (directory / name).is_dir()}
    return sorted(names)


def copy_model_files(source: str | Path, destination: str | Path) -> list[str]:
    """Copies `source`'s tokenizer and generation files into the existing directory `destination`; returns their
    names (`model_files`)."""
    source, destination = Path(source), Path(destination)
    names = model_files(source)
    for name in names:
        if name.endswith("/"):
            shutil.copytree(source / name, destination / name)
        else:
            shutil.copyfile(source / name, destination / name)
    return names

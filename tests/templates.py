"""A model folder with a chat template of the test's choosing (the bundled target's
tokenizer), and a template shaped like Qwen3's where SpecEdge's features touch it."""

import pathlib
import shutil

from specedge.models import BUNDLED_TARGET, bundled

QWEN3_LIKE = (  # the parts of Qwen3's template these features touch
    "{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}")


def model_dir(folder: pathlib.Path, template: str) -> pathlib.Path:
    """`folder` holding the bundled target's tokenizer with `template` as its chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(f"{bundled(BUNDLED_TARGET)}/{name}", folder / name)
    (folder / "chat_template.jinja").write_text(template)
    return folder

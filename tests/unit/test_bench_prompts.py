"""`specedge bench --prompts FILE`: a file's prompts are used as they are, whatever its categories."""

import json

import pytest

from specedge_bench.serving import load_prompts


def test_a_prompts_file_with_its_own_categories_or_none(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(3)) + "\n")
    assert load_prompts(str(plain), (), 2) == {"all": ["p0", "p1"]}
    own = tmp_path / "own.jsonl"
    own.write_text("\n".join(json.dumps({"category": c, "turns": [f"{c}{i}"]}) for c in ("code", "chat")
                             for i in range(2)) + "\n")
    assert load_prompts(str(own), (), 1) == {"chat": ["chat0"], "code": ["code0"]}
    with pytest.raises(ValueError, match="no prompts for categories"):
        load_prompts(str(own), ("rag",), 1)

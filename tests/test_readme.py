"""The README's quickstart runs as written."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs():
    text = README.read_text()
    code = text.split("## Quickstart", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(code, "README quickstart", "exec"), {})


def test_qlora_snippet_runs_after_the_quickstart():
    text = README.read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    qlora = text.split("## QLoRA", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(quickstart, "README quickstart", "exec"), namespace)
    exec(compile(qlora, "README QLoRA", "exec"), namespace)
    assert namespace["report"].errors

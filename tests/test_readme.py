"""The README and the docs as a new user reads them: the README's code example runs and does what it says, its test
command is the one CI runs, every relative link resolves inside the repository, and every `python -m` module
they name exists."""
import os
import re

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/guide.md", "docs/design.md", "docs/performance.md", "benchmarks/README.md",
        "results/README.md", "docs/results.md", "docs/hf_export.md"]


def _read(rel: str) -> str:
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
        return f.read()


def _readme_example() -> str:
    section = _read("README.md").split("## mHC around your own module", 1)
    assert len(section) == 2, "README lost its 'mHC around your own module' section"
    match = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert match, "no python block in the README's mHC example section"
    return match.group(1)


def test_readme_example_runs_and_wraps_an_mlp_in_mhc():
    code = _readme_example()
    assert len(code.strip().splitlines()) <= 6, "the README promises a short example"
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), scope)
    y, connection, ends = scope["y"], scope["connection"], scope["ends"]
    assert y.shape == (2, 16, 64)
    assert type(connection).__name__ == "DynamicMHC" and connection.num_streams == 4
    # the connection really mixes 4 streams: its H_res is 4x4 and it learns (gradients reach every parameter)
    y.square().mean().backward()
    for name, p in list(connection.named_parameters()) + list(ends.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert connection.phi.grad.abs().sum() > 0 and scope["mlp"][0].weight.grad.abs().sum() > 0


def test_readme_example_disabled_is_the_plain_residual():
    """The same lines with mHC disabled give x + mlp(RMSNorm(x)), the baseline's connection."""
    code = _readme_example().replace("MHCConfig(enabled=True", "MHCConfig(enabled=False")
    code = code.replace("torch.randn(2, 16, 64)", "x")
    x = torch.randn(2, 16, 64)
    scope: dict = {"x": x}
    exec(compile(code, "README.md", "exec"), scope)
    expected = x + scope["mlp"](torch.nn.functional.rms_norm(x, (64,)))
    torch.testing.assert_close(scope["y"], expected)


def test_readme_test_command_is_what_ci_runs():
    readme, ci = _read("README.md"), _read(".ci/run")
    assert "bash scripts/run_tests.sh" in readme
    assert re.search(r"^bash scripts/run_tests\.sh", ci, re.M), ".ci/run must run the README's test command"


@pytest.mark.parametrize("doc", DOCS)
def test_doc_links_stay_inside_the_repo_and_resolve(doc):
    text = _read(doc)
    base = os.path.dirname(os.path.join(REPO, doc))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"https?://", target):
            continue
        path = os.path.normpath(os.path.join(base, target.split("#")[0]))
        assert path.startswith(REPO + os.sep), f"{doc} links outside the repository: {target}"
        assert os.path.exists(path), f"{doc} links to a missing file: {target}"
    assert "../shared" not in text.replace("`../shared/data`", ""), f"{doc} points into ../shared"


@pytest.mark.parametrize("doc", DOCS)
def test_doc_commands_name_existing_modules(doc):
    for module in set(re.findall(r"python -m ((?:scripts|analysis|benchmarks|nanochat)\.[a-z_]+)", _read(doc))):
        path = os.path.join(REPO, *module.split(".")) + ".py"
        assert os.path.isfile(path), f"{doc} runs `python -m {module}`, which does not exist"

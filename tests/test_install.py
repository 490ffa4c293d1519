"""The pinned install: constraints.txt pins every requirement of setup.py to a version its range admits, so
`bash install.sh` never resolves a package unpinned, and a range edited in setup.py cannot drift from the lock."""
import ast
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO


def setup_requirements() -> list[Requirement]:
    """install_requires and every extra but the optional GPU one, read from setup.py's own text."""
    call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg in ("install_requires", "extras_require")}
    extras = [req for name, reqs in kwargs["extras_require"].items() if name != "gpu" for req in reqs]
    return [Requirement(r) for r in kwargs["install_requires"] + extras]


def locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
            assert match, f"constraints.txt: not an exact pin: {line!r}"
            name = canonicalize_name(match.group(1))
            assert name not in pins, f"constraints.txt pins {name} twice"
            pins[name] = match.group(2)
    return pins


def test_every_requirement_of_setup_py_is_pinned_within_its_range():
    pins = locked()
    for req in setup_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required by setup.py but not pinned: run `bash install.sh --refresh-lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside setup.py's {req}")
    assert "pip" in pins and "para-train" not in pins  # install.sh installs the locked pip; the project is not pinned

"""Exit 0 when this Python can run ./test.sh and ./bench.sh as is, with nothing installed: torch,
triton (on Linux), numpy and pytest are there, at versions requirements.txt accepts. Else say
what is missing and exit 1. scripts/env.sh asks this of python3 before it would create .venv."""
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

NEEDED = {"torch", "triton", "numpy", "pytest"}
REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"


def problems() -> list[str]:
    try:
        from packaging.requirements import Requirement  # installed with pytest
    except ImportError:
        return ["pytest is not installed (nor packaging, which comes with it)"]
    found = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.name not in NEEDED or (requirement.marker and not requirement.marker.evaluate()):
            continue
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            found.append(f"{requirement.name} is not installed")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            found.append(f"{requirement.name} {installed} is not in the supported range {requirement.specifier}")
    return found


if __name__ == "__main__":
    missing = problems()
    for problem in missing:
        print(f"{sys.executable}: {problem}", file=sys.stderr)
    sys.exit(1 if missing else 0)

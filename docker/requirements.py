"""Print the requirements of pagedq and the given extras, one per line, from pyproject.toml alone.

The images install these before the source is copied in, so a code change rebuilds only the last layer
(`pip install --no-deps .`), not torch and transformers:  `python requirements.py worker > req.txt`.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(project: dict, extras: list[str]) -> list[str]:
    name, found = project["name"], list(project["dependencies"])
    for extra in extras:
        for requirement in project["optional-dependencies"][extra]:
            if requirement.startswith(f"{name}["):  # another extra of this project
                found += requirements({**project, "dependencies": []},
                                      requirement[len(name) + 1 : requirement.index("]")].split(","))
            else:
                found.append(requirement)
    return list(dict.fromkeys(found))


if __name__ == "__main__":
    with open("pyproject.toml", "rb") as f:
        print("\n".join(requirements(tomllib.load(f)["project"], sys.argv[1:])))

"""`rehost agent-bundle`: the agent as one file that the source's own python3 runs.

Source servers often have only their distribution's Python (3.6 on CentOS 7 and 8) and no
route to a package index, so the agent ships as a zipapp of the stdlib-only modules: the
protocol and rehost/online/agent/. The real rehost/__init__.py is not included, because the
package's top level may import things the source does not have; a stub carries the version.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipapp
from pathlib import Path

import rehost
from rehost.errors import SystemError_

INTERPRETER = "/usr/bin/env python3"
MAIN = """import sys

from rehost.online.agent.main import main

sys.exit(main())
"""


def _sources() -> dict[str, Path]:
    """Archive name -> source file, for everything the agent may import."""
    pkg = Path(rehost.__file__).parent
    files = {
        "rehost/online/protocol.py": pkg / "online" / "protocol.py",
        "rehost/online/agent/__init__.py": pkg / "online" / "agent" / "__init__.py",
    }
    for path in sorted((pkg / "online" / "agent").glob("*.py")):
        files[f"rehost/online/agent/{path.name}"] = path
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemError_(f"the agent sources are incomplete: missing {', '.join(missing)}")
    return files


def build_bundle(out: Path) -> Path:
    """Write the agent zipapp to `out` (mode 0755, `#!/usr/bin/env python3`) and return it."""
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="rehost-bundle-") as tmp:
        root = Path(tmp)
        for name, src in _sources().items():
            dest = root / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        (root / "rehost" / "__init__.py").write_text(
            f'"""rehost\'s online agent, bundled."""\n\n__version__ = "{rehost.__version__}"\n'
        )
        (root / "rehost" / "online" / "__init__.py").write_text("")
        (root / "__main__.py").write_text(MAIN)
        partial = out.with_name(out.name + ".partial")
        zipapp.create_archive(root, partial, interpreter=INTERPRETER, compressed=True)
        os.chmod(partial, 0o755)
        os.replace(partial, out)
    return out

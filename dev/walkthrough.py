#!/usr/bin/env python3
"""Runs the local part of walkthrough.md: its ```sh local``` and ```python local``` blocks, in
order, in one bash shell.

    python3 dev/walkthrough.py test    # in a fresh temp dir; stops everything at the end (./dev/test)
    python3 dev/walkthrough.py demo    # in .demo/, leaves the clusters and nodes running (./dev/demo)
    python3 dev/walkthrough.py list    # prints the script it would run

A block tagged `fails=TEXT` must exit non-zero and print TEXT (the troubleshooting examples);
blocks tagged `cleanup` run last in `test` mode, also after a failure, and never in `demo` mode.
Python blocks run with the venv's python (`python` on the PATH the walkthrough sets).
"""

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(sh|python) local(?: ([^\n]*))?\n(.*?)^```\n", re.M | re.S)


def blocks():
    text = (ROOT / "walkthrough.md").read_text()
    found = []
    for match in FENCE.finditer(text):
        lang, tags, body = match.group(1), (match.group(2) or "").split(), match.group(3)
        heading = [h for h in re.findall(r"^#{2,3} (.*)$", text[: match.start()], re.M)][-1]
        fails = next((t.split("=", 1)[1] for t in tags if t.startswith("fails=")), None)
        found.append({"lang": lang, "body": body, "heading": heading,
                      "cleanup": "cleanup" in tags, "fails": fails})
    if not found:
        sys.exit("walkthrough.md has no local blocks")
    return found


def as_shell(block, index):
    body = block["body"]
    if block["lang"] == "python":
        body = f"python - <<'RHIO_WALKTHROUGH_PY'\n{body}RHIO_WALKTHROUGH_PY\n"
    if block["fails"]:
        out = f'"$WT/.block-{index}.out"'
        expected = shlex.quote(block["fails"])
        return (f"if ( set -e\n{body}) > {out} 2>&1; then cat {out}; "
                f"echo 'walkthrough: this block should have failed' >&2; exit 1; fi\n"
                f"cat {out}\n"
                f"grep -q -- {expected} {out} || "
                f"{{ echo 'walkthrough: the failure does not say '{expected} >&2; exit 1; }}\n")
    return body


def script(selected):
    parts = ["set -euo pipefail", f"cd {shlex.quote(str(ROOT))}"]
    heading = None
    for index, block in enumerate(selected):
        if block["heading"] != heading:
            heading = block["heading"]
            parts.append(f"printf '\\n== %s  (%ss)\\n' {shlex.quote(heading)} $SECONDS")
        parts.append(as_shell(block, index))
    return "\n".join(parts) + "\n"


def run(selected, env, log):
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(["bash", "-c", script(selected)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out.write(proc.stdout)
    sys.stdout.write(proc.stdout)
    return proc.returncode, time.monotonic() - start


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "test"
    every = blocks()
    steps = [b for b in every if not b["cleanup"]]
    cleanup = [b for b in every if b["cleanup"]]
    if mode == "list":
        print(script(steps) + "# cleanup\n" + script(cleanup))
        return
    if mode not in ("test", "demo"):
        sys.exit(__doc__)
    env = dict(os.environ)
    env.pop("WT", None)
    if mode == "test":
        work = tempfile.mkdtemp(prefix="rhio-walkthrough-")
        env["WT"] = work
    else:
        env["WT"] = str(ROOT / ".demo")
        Path(env["WT"]).mkdir(exist_ok=True)
    code, seconds = run(steps, env, Path(env["WT"]) / "walkthrough.log")
    if mode == "test":
        # Cleanup needs only $WT (set here), so it runs even when the first steps failed.
        run(cleanup, env, Path(env["WT"]) / "cleanup.log")
        if code != 0:
            sys.exit(f"walkthrough: a local block failed (exit {code}); work dir {env['WT']}")
        print(f"\nwalkthrough: {len(steps)} local blocks ran in {seconds:.0f} s; all passed")
        subprocess.run(["rm", "-rf", env["WT"]])
        return
    if code != 0:
        sys.exit(f"demo: a step failed (exit {code}); see {env['WT']}/walkthrough.log; ./dev/demo stop")
    print(f"""
== the demo is running ({seconds:.0f} s)
Everything walkthrough.md part 1 did ran: two clusters, two nodes, a message routed a -> b, a
16 MiB Parquet file imported in a, replicated to b, consumed, fetched, read in Python and pulled
from the registry. It keeps running; explore with the commands of walkthrough.md after

  export WT={env['WT']} PATH="${{CARGO_TARGET_DIR:-$HOME/.cache/rhio/target}}/debug:$HOME/.cache/rhio/venv/bin:$PATH"
  set -a; . $WT/env/env; set +a; KEY_A=$(cat $WT/a/public.key)

  node a: http://127.0.0.1:18081/health  node b: http://127.0.0.1:18082/health   logs: $WT/[ab]/node.log
  stop everything: ./dev/demo stop""")


if __name__ == "__main__":
    main()

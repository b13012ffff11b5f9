"""Per-kernel register spills of the kernels library, from the ptxas -v logs that tools/ptxas_log.sh
keeps beside each object (<object>.ptxas.log). Prints one line per kernel that spills, with its
registers, and a summary. Exits non-zero when a kernel spills more than TPEXT_MAX_SPILL_BYTES (stores +
loads, default 32) unless TPEXT_ALLOW_SPILLS=1: a launch bound too tight for a kernel's registers shows
as tens to hundreds of bytes (the fused norm at 1024 threads: up to 148 B stores + 396 B loads), while a
few bytes at a low register count (a loop value ptxas chose to keep in local memory) are only reported.

    python3 tools/ptxas_spills.py build/cuda-check/CMakeFiles/tpext_kernels.dir
"""

import os
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
PROPS = re.compile(r"Function properties for (\S+)")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")


def parse(text):
    """{(function, arch): {"stack", "stores", "loads", "regs"}} of the entry functions in one log."""
    kernels, current, arch, props = {}, None, "", None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current, arch = m.group(1), m.group(2)
            kernels[(current, arch)] = {"stack": 0, "stores": 0, "loads": 0, "regs": 0}
        elif m := PROPS.search(line):
            props = m.group(1)
        elif (m := SPILL.search(line)) and props == current and current is not None:
            k = kernels[(current, arch)]
            k["stack"], k["stores"], k["loads"] = (int(g) for g in m.groups())
        elif (m := REGS.search(line)) and current is not None:
            kernels[(current, arch)]["regs"] = int(m.group(1))
    return kernels


def demangle(names):
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def main(directory):
    logs = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs if f.endswith(".ptxas.log")
    )
    if not logs:
        sys.exit(f"ptxas_spills: no *.ptxas.log under {directory} (configure with -DTPEXT_PTXAS_VERBOSE=ON)")
    limit = int(os.environ.get("TPEXT_MAX_SPILL_BYTES", "32"))
    spilling, total = [], 0
    for log in logs:
        kernels = parse(open(log, encoding="utf-8", errors="replace").read())
        total += len(kernels)
        source = os.path.basename(log).split(".")[0]
        for (name, arch), k in kernels.items():
            if k["stores"] or k["loads"]:
                spilling.append((source, name, arch, k))
    names = demangle([name for _, name, _, _ in spilling])
    for (source, _, arch, k), name in zip(spilling, names):
        print(
            f"  SPILL {source} [{arch}] {k['regs']} registers, {k['stores']} B spill stores, "
            f"{k['loads']} B spill loads, {k['stack']} B stack: {name}"
        )
    over = [k for _, _, _, k in spilling if k["stores"] + k["loads"] > limit]
    print(
        f"cuda_compile_check: ptxas -v: {total} kernels in {len(logs)} objects, "
        f"{len(spilling)} with register spills, {len(over)} over {limit} bytes"
    )
    if over and os.environ.get("TPEXT_ALLOW_SPILLS") != "1":
        sys.exit(
            f"cuda_compile_check: {len(over)} kernels spill more than {limit} bytes (above); fix "
            "their launch bounds or register use, or set TPEXT_ALLOW_SPILLS=1 to report without failing"
        )


if __name__ == "__main__":
    main(sys.argv[1])

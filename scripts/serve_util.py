"""Starting and stopping an `llmtune api` / `llmtune web` server for the check scripts."""

import os
import re
import subprocess
import threading


def find_binary():
    """$LLMTUNE_BIN, else target/release/llmtune, else target/debug/llmtune (under
    $CARGO_TARGET_DIR when set)."""
    if os.environ.get("LLMTUNE_BIN"):
        return os.environ["LLMTUNE_BIN"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
    for profile in ("release", "debug"):
        p = os.path.join(target, profile, "llmtune")
        if os.path.exists(p):
            return p
    raise SystemExit("no llmtune binary: build it (cargo build --release -p llmtune-cli) or set LLMTUNE_BIN")


class Server:
    """Runs `llmtune <cmd> ... --port 0` and waits until it prints its address."""

    def __init__(self, args, cmd="api"):
        self.bin = find_binary()
        argv = [self.bin, cmd, "--host", "127.0.0.1", "--port", "0"] + list(args)
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        self.log = []
        self.base = None
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"on (http://[0-9.:]+)/v1", line)
            if m:
                self.base = m.group(1)
                break
        if self.base is None:
            raise SystemExit("server exited before listening:\n" + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def pid(self):
        return self.proc.pid

    def rss_kib(self):
        """Resident set size of the server process (KiB), from /proc."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

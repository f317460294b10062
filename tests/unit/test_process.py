import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import sys, time
from defectloop.process import ManagedProcess, exit_on_sigterm
exit_on_sigterm()
server = ManagedProcess("sleeper", ["sleep", "300"], {}, "http://127.0.0.1:9", sys.argv[1]).start()
try:
    print(server.pid, flush=True)
    time.sleep(300)
finally:
    server.stop(5)
"""


def test_sigterm_stops_the_servers_a_process_started(tmp_path):
    """``kill`` of the demo (docker stop, an eviction) must not leave its servers running."""
    parent = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "sleeper.log")], stdout=subprocess.PIPE,
                              text=True)
    server_pid = int(parent.stdout.readline())
    assert Path(f"/proc/{server_pid}").exists()
    os.kill(parent.pid, signal.SIGTERM)
    assert parent.wait(20) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while Path(f"/proc/{server_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{server_pid}").exists()

"""The tests' warm processes behave as a fresh interpreter running the same command does."""

import os
import signal
import subprocess
import sys

import pytest

from tests import warm

PROGRAMS = {
    "argv, path, cwd, environment, exit status": [
        "-c", "import os, sys; print(sys.argv, sys.path[0] in ('', os.getcwd()), os.getcwd(), os.environ['X'])\n"
        "sys.exit(3)", "a", "b c"],
    "an uncaught exception": ["-c", "raise ValueError('boom')"],
    "an uncaught Ctrl-C": ["-c", "raise KeyboardInterrupt"],
    "death by a signal": ["-c", "import os, signal; print('before', flush=True); os.kill(os.getpid(), signal.SIGTERM)"],
    "exit with a message": ["-c", "import sys; sys.exit('gone')"],
    "atexit and a thread still running": [
        "-c", "import atexit, threading, time; atexit.register(print, 'at exit')\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start(); print('main')"],
    "-u and the streams' buffering": ["-u", "-c", "import sys; sys.stdout.write('out '); sys.stderr.write('err ')\n"
                                      "print(sys.stdout.line_buffering, sys.stderr.line_buffering, sys.stdin.readline())"],
    "a script": ["script.py", "x"],
    "a module": ["-m", "script", "y"],
}


@pytest.mark.parametrize("args", PROGRAMS.values(), ids=PROGRAMS.keys())
def test_a_warm_process_is_what_a_fresh_interpreter_is(args, tmp_path):
    (tmp_path / "script.py").write_text("import os, sys\nprint(__name__, os.path.basename(__file__), sys.argv[1:], "
                                        "sys.path[0] == os.path.dirname(os.path.abspath(__file__)))\n")
    kwargs = dict(cwd=tmp_path, env={**os.environ, "X": "from the environment"}, input="a line\n",
                  capture_output=True, text=True, timeout=60)
    fresh = subprocess.run([sys.executable, *args], **kwargs)
    for started in (warm.run([sys.executable, *args], **kwargs),  # as the tests start it
                    subprocess.run([warm.interpreter(), *args], **kwargs)):  # as torchrun starts its workers
        assert (started.returncode, started.stdout, started.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


def test_the_stand_in_interpreter_passes_a_signal_to_its_process_group_and_exits_as_it_did():
    """torchrun's workers lead their own sessions, and torchrun stops them with killpg."""
    # (the handler writes past sys.stdout: it may run while the main thread is still in its print)
    code = ("import os, signal, time\n"
            "signal.signal(signal.SIGUSR1, lambda *_: (os.write(1, b'signalled, own group %d\\n' % "
            "(os.getpgid(0) == os.getpid())), os._exit(7)))\nprint('ready', flush=True)\ntime.sleep(60)")
    proc = subprocess.Popen([warm.interpreter(), "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline() == "ready\n"
    os.killpg(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=60) == 7
    assert proc.stdout.read() == "signalled, own group 1\n"


def test_a_warm_process_asked_for_its_own_session_leads_it():
    proc = warm.popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    assert os.getsid(proc.pid) == proc.pid
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

"""Real processes for tests, started without a fresh interpreter's 8-10 s of importing torch and timm.

A server process imports them once and forks a child for each command (`popen`, `run`: the
arguments of `subprocess.Popen` and `subprocess.run` that the tests use). The child is a real
process: its own pid, its own session when asked (signals to its process group reach its loader
workers), a real exit status, real file descriptors; it runs `python -m MOD`, `-c CODE` or a script
the way the interpreter would (argv, sys.path[0], cwd, environment, `-u`, atexit, exit status, the
traceback and status of an uncaught exception, death by an uncaught Ctrl-C).

torchrun is started the same way and starts its workers through this file as a stand-in
interpreter (torchrun's PYTHON_EXEC): a few milliseconds of stdlib Python that has the server fork
the worker, passes on every signal it gets (to the worker's process group when it leads its own,
as torchrun's workers do: torchrun signals them with killpg) and exits as the worker did.

What a fork does not reproduce: the hash seed of str (one per server, not per process) and
settings read when a library loads (OMP_NUM_THREADS is applied with torch.set_num_threads). The
server refuses to start if the imports print anything, which a warm child would not repeat.

This module imports the standard library alone: the stand-in interpreter runs it with `python -S`.
"""

from __future__ import annotations

import io
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

SOCKET_ENV = "POWERGRAD_TEST_WARM"  # the server's socket, for the stand-in interpreter
# What the tests' processes import, and the package but its __main__: a module run with -m is not
# imported before it runs (in a fresh interpreter neither).
PRELOAD = ("timm", "torch.distributed.launcher.api", "torch.utils.tensorboard",
           "tensorboard.backend.event_processing.event_accumulator", "nvidia.dali.plugin.pytorch")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT,
             signal.SIGCONT)


# ---- the test's side ------------------------------------------------------------------------------

class Server:
    """The forking server of a test session (started by conftest when a collected test uses it)."""

    def __init__(self, cwd):
        self.folder = tempfile.mkdtemp(prefix="warm-")
        self.socket_path = os.path.join(self.folder, "socket")
        self.log = os.path.join(self.folder, "server.log")
        self.interpreter = os.path.join(self.folder, "python")  # torchrun's workers start through it
        with open(self.interpreter, "w") as f:
            f.write(f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                    "import warm\nwarm.stand_in(sys.argv[1:])\n")
        os.chmod(self.interpreter, 0o755)
        with open(self.log, "wb") as log:
            # torch reads $CXX once, at import: the server imports it without, so a child's compiler is
            # found on the PATH its test gives it.
            env = {k: v for k, v in os.environ.items() if k != "CXX"}
            self.process = subprocess.Popen([sys.executable, __file__, "serve", self.socket_path], cwd=cwd,
                                            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.environ[SOCKET_ENV] = self.socket_path

    def wait_ready(self, timeout=300):
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                with open(self.log) as f:
                    raise RuntimeError(f"the warm-process server did not start: {f.read()[-3000:]}")
            time.sleep(0.05)

    def close(self):
        self.process.kill()
        self.process.wait()
        os.environ.pop(SOCKET_ENV, None)
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))
        os.rmdir(self.folder)


SERVER: Server | None = None


def _connect() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(_server().socket_path)
    return sock


def _server() -> Server:
    global SERVER
    if SERVER is None:  # (conftest starts it early, and stops it)
        SERVER = Server(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    SERVER.wait_ready()
    return SERVER


def interpreter() -> str:
    """The stand-in interpreter, for code under test that starts `sys.executable` itself."""
    return _server().interpreter


def _send(sock, fds: list[int], args: list, cwd: str, env: dict, session: bool, file_size_limit=None,
          controlling_terminal=False) -> int:
    """Asks for a child running `python ARGS` with `fds` as its stdin, stdout and stderr; returns its
    pid once it is set up (its session, files, folder: as Popen)."""
    payload = pickle.dumps({"args": args, "cwd": cwd, "env": env, "session": session,
                            "file_size_limit": file_size_limit, "controlling_terminal": controlling_terminal})
    socket.send_fds(sock, [struct.pack("!I", len(payload)) + payload], fds)
    what, number = _read_line(sock).split()
    if what != b"pid":
        raise RuntimeError(f"a warm process failed before its command ran (wait status {int(number)})")
    return int(number)


def _exit_status(sock) -> int:
    what, number = _read_line(sock).split()
    assert what == b"exit", what
    return int(number)


def _read_line(sock) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise RuntimeError("the warm-process server went away")
        line += chunk
    return line


class WarmProcess:
    """What the tests use of subprocess.Popen, for a child of the server."""

    def __init__(self, args, *, cwd=None, env=None, stdin=None, stdout=None, stderr=None, text=False,
                 start_new_session=False, file_size_limit=None, controlling_terminal=False):
        python, *args = args
        assert python == sys.executable, "warm processes run this interpreter"
        env = dict(os.environ if env is None else env)
        sock = _connect()
        if args[:2] == ["-m", "torch.distributed.run"]:
            env["PYTHON_EXEC"] = interpreter()
        ours, theirs = [], []
        for fd, spec in enumerate((stdin, stdout, stderr)):
            if spec == subprocess.PIPE:
                read, write = os.pipe()
                ours.append((read, write)[fd == 0])
                theirs.append((read, write)[fd != 0])
            elif spec == subprocess.DEVNULL:
                theirs.append(os.open(os.devnull, os.O_RDWR))
            elif spec == subprocess.STDOUT:
                theirs.append(os.dup(theirs[1]))
            else:
                theirs.append(os.dup(fd if spec is None else spec if isinstance(spec, int) else spec.fileno()))
        self.args = [python, *args]
        self.returncode = None
        self._sock = sock
        try:
            self.pid = _send(self._sock, theirs, args, os.fspath(cwd or os.getcwd()), env, start_new_session,
                             file_size_limit, controlling_terminal)
        finally:
            for fd in theirs:
                os.close(fd)
        files = iter(ours)
        self.stdin = self.stdout = self.stderr = None
        for name, spec, mode in (("stdin", stdin, "wb"), ("stdout", stdout, "rb"), ("stderr", stderr, "rb")):
            if spec == subprocess.PIPE:
                f = os.fdopen(next(files), mode)
                setattr(self, name, io.TextIOWrapper(f, write_through=True) if text else f)

    def poll(self):
        if self.returncode is None and select.select([self._sock], [], [], 0)[0]:
            self._finish()
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if not select.select([self._sock], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._finish()
        return self.returncode

    def _finish(self):
        self.returncode = os.waitstatus_to_exitcode(_exit_status(self._sock))
        self._sock.close()

    def communicate(self, input=None, timeout=None):
        if self.stdin:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        read = {}
        readers = [threading.Thread(target=lambda name=name: read.update({name: getattr(self, name).read()}),
                                    daemon=True) for name in ("stdout", "stderr") if getattr(self, name)]
        for r in readers:
            r.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in readers:
            r.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if r.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        for name in ("stdout", "stderr"):
            if getattr(self, name):
                getattr(self, name).close()
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return read.get("stdout"), read.get("stderr")

    def send_signal(self, signum):
        # As Popen: a process that has ended is not signalled. The server reaps it at once, so its pid is
        # gone even before this side has read its exit status.
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def popen(args, **kwargs) -> WarmProcess:
    return WarmProcess(args, **kwargs)


def run(args, *, input=None, capture_output=False, timeout=None, **kwargs) -> subprocess.CompletedProcess:
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        kwargs.update(stdin=subprocess.PIPE)
    proc = WarmProcess(args, **kwargs)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL) if kwargs.get("start_new_session") else proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ---- the stand-in interpreter (torchrun's workers) ---------------------------------------------------

def stand_in(args):
    """`python ARGS` as a child of the server: signals passed on, its exit status mirrored."""
    child = []
    pending = []
    leader = os.getpgid(0) == os.getpid()

    def forward(signum, _frame):
        if not child:
            pending.append(signum)
            return
        try:
            os.killpg(child[0], signum) if leader else os.kill(child[0], signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.environ[SOCKET_ENV])
    child.append(_send(sock, [0, 1, 2], args, os.getcwd(), dict(os.environ), session=leader))
    for signum in pending:
        forward(signum, None)
    status = _exit_status(sock)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))


# ---- the server ---------------------------------------------------------------------------------------

def serve(socket_path):
    import importlib
    import pkgutil
    printed = tempfile.TemporaryFile()
    saved = os.dup(1), os.dup(2)
    os.dup2(printed.fileno(), 1)
    os.dup2(printed.fileno(), 2)
    try:
        for name in PRELOAD:
            importlib.import_module(name)
        import powergrad_train
        for module in pkgutil.walk_packages(powergrad_train.__path__, "powergrad_train."):
            if not module.name.endswith(".__main__"):
                importlib.import_module(module.name)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in enumerate(saved, start=1):
            os.dup2(copy, fd)
            os.close(copy)
    printed.seek(0)
    output = printed.read()
    printed.close()
    if output:
        sys.exit(f"the imports printed something, which a warm child would not print again: {output[-2000:]!r}")
    assert threading.active_count() == 1, "a thread started by an import would not survive a fork"
    import gc
    gc.freeze()  # what was imported is left to the collector of no child (each collection would copy it)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path + ".new")
    listener.listen(64)
    os.rename(socket_path + ".new", socket_path)  # ready once it exists
    children = {}  # pid -> (connection, own session)
    watched = {}  # connection -> pid, until its peer goes away
    while os.getppid() == parent:
        for sock in select.select([listener, *watched], [], [], 0.05)[0]:
            if sock is listener:
                conn, _ = listener.accept()
                request, fds = _receive(conn)
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for other, _ in children.values():
                        other.close()
                    try:
                        _become(request, fds, conn)
                    finally:  # (an error before the command ran: its traceback went to the child's stderr)
                        os._exit(1)
                for fd in fds:
                    os.close(fd)
                children[pid] = conn, request["session"]
                watched[conn] = pid
            elif not sock.recv(1):  # the test or stand-in that asked for it is gone: so is the child
                pid = watched.pop(sock)
                try:
                    os.killpg(pid, signal.SIGKILL) if children[pid][1] else os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn, _ = children.pop(pid)
            watched.pop(conn, None)
            try:
                conn.sendall(b"exit %d\n" % status)
            except OSError:
                pass
            conn.close()


def _receive(conn):
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    (size,) = struct.unpack("!I", data[:4])
    data = data[4:]
    while len(data) < size:
        data += conn.recv(size - len(data))
    return pickle.loads(data), fds


def _become(request, fds, conn):
    """In the forked child: become `python ARGS` as started by the one who asked."""
    if request["session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    if request["controlling_terminal"]:
        import fcntl
        import termios
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    if request["file_size_limit"] is not None:
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["file_size_limit"],) * 2)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    args = [os.fsdecode(a) for a in request["args"]]
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    while args[0] == "-u":
        unbuffered = True
        args.pop(0)
    _fresh_streams(unbuffered)
    conn.sendall(b"pid %d\n" % os.getpid())  # set up: the asker may signal its session now
    conn.close()
    import numpy
    import torch
    numpy.random.seed()  # a fresh interpreter's numpy draws its own seed
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    os._exit(_run_as_main(args))


def _fresh_streams(unbuffered):
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        old = getattr(sys, name)
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        buffered = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(buffered, encoding=old.encoding, errors=old.errors,
                                  line_buffering=not unbuffered and (fd == 2 or (fd == 1 and raw.isatty())),
                                  write_through=unbuffered and fd > 0)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _run_as_main(args) -> int:
    import atexit
    import runpy
    import types
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    interrupted = False
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path[0] = os.getcwd()
            runpy._run_module_as_main(args[1], alter_argv=True)
        elif args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path[0] = ""
            exec(compile(args[1], "<string>", "exec"), main.__dict__)
        elif args[0].startswith("-"):
            raise SystemExit(f"warm: python option {args[0]} is not supported here")
        else:
            sys.argv = args
            sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
            runpy.run_path(args[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt as e:
        e.with_traceback(e.__traceback__.tb_next)  # (the traceback starts where the command's does)
        sys.excepthook(type(e), e, e.__traceback__)
        code, interrupted = 1, True
    except BaseException as e:
        e.with_traceback(e.__traceback__.tb_next)
        sys.excepthook(type(e), e, e.__traceback__)
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120
    if interrupted:  # as the interpreter does: die of the SIGINT, so the parent sees it
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    assert sys.argv[1] == "serve"
    serve(sys.argv[2])

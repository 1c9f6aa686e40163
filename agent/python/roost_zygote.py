"""Roost's zygote: a fork server for one Python interpreter (DESIGN.md, decision 4).

The agent starts one per base interpreter, as root, with:

    fd 3  control   SOCK_SEQPACKET: the agent asks for a fork, the zygote answers with the
                    child's pid and a pidfd for it (SCM_RIGHTS)
    fd 4  events    SOCK_SEQPACKET: the zygote reports each child's exit status
    fd 5  lifeline  the read end of a pipe whose write end only the agent holds

It imports the WSGI server and the modules the operator lists, forks a spare (a child that
waits, unspecialised, to be handed a request), then waits. It never sees a
site's code, files, environment or privilege: a fork request carries one fd, a fresh
socket whose other end the agent keeps. The child reads its site's spec (and its listening
socket and log file) from that socket itself, after the fork, so no site's data ever
passes through the zygote's memory, which every later worker inherits.

The child, in an order that leaves nothing behind: joins the site's cgroups, starts a new
session, sets its supplementary groups, gid and uid, no-new-privs and umask 027, keeps only
fd 0 (/dev/null), 1 and 2 (the site's log), 3 (the listening socket) and 4 (the lifeline),
replaces its environment with the site's, enters the site's directory as the user, puts it
and its virtualenv's site-packages on sys.path, imports the app and serves it on the
inherited socket with `roost_worker.serve` (gunicorn's gthread worker, no arbiter). Workers outlive the zygote;
they stop when the agent goes away (EOF on the lifeline, watched by the server's own loop).
"""

import ctypes
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

# The worker's server lives beside this script. -I keeps the script's directory off sys.path,
# so it is put there for this one import only: a worker's sys.path is its site's alone.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roost_worker  # noqa: E402  (the WSGI server: the first preload)
from roost_worker import LISTEN_FD, WORKER_LIFELINE_FD  # noqa: E402

del sys.path[0]

CONTROL_FD, EVENTS_FD, LIFELINE_FD = 3, 4, 5
MAX_SPEC = 1 << 20
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def log(msg):
    sys.stderr.write("roost-zygote[%d]: %s\n" % (os.getpid(), msg))
    sys.stderr.flush()


def prctl(option, arg):
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "prctl(%d): %s" % (option, os.strerror(e)))


def set_name(name):
    try:
        prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))
    except OSError:
        pass


def status_text(status):
    """Describe a wait status the way the agent's direct spawn does (Rust's ExitStatus)."""
    if os.WIFEXITED(status):
        return "exit status: %d" % os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = " (%s)" % signal.Signals(sig).name
        except ValueError:
            name = ""
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return "signal: %d%s%s" % (sig, name, core)
    return "wait status %d" % status




# --- the worker: everything after the fork ------------------------------------------------------


def _high(fd):
    """Move `fd` out of the way of fds 0-4 (close-on-exec, the original closed)."""
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64)
    os.close(fd)
    return new


def _site_packages(venv):
    return "%s/lib/python%d.%d/site-packages" % (venv.rstrip("/"), sys.version_info[0], sys.version_info[1])


def _setup_path(site_dir, venv):
    """The site's directory first, then its virtualenv's site-packages (with its .pth files),
    then the interpreter's own path. Preloaded modules that the virtualenv also provides are
    forgotten, so the site imports its own version."""
    import site

    front = [site_dir]
    if venv:
        sp = _site_packages(venv)
        before = list(sys.path)
        site.addsitedir(sp)
        added = [p for p in sys.path if p not in before]
        sys.path[:] = before
        front += added or [sp]
        try:
            names = set(os.listdir(sp))
        except OSError:
            names = set()
        shadowed = set()
        for mod in list(sys.modules):
            top = mod.split(".", 1)[0]
            if top in names or top + ".py" in names:
                shadowed.add(top)
        for mod in list(sys.modules):
            if mod.split(".", 1)[0] in shadowed:
                del sys.modules[mod]
    # (No importlib.invalidate_caches(): these directories are new to this process, so no
    # finder has cached them; it would cost a third of a millisecond of copy-on-write.)
    sys.path[:] = front + [p for p in sys.path if p not in front]


def _join_cgroup(procs):
    """Move this process into the cgroup whose `cgroup.procs` is `procs`.

    On cgroup v1, writing a pid to `cgroup.procs` takes the kernel's global threadgroup lock
    for writing, which waits for an RCU grace period: ~7-12 ms on our machines, the largest
    piece of a cold start. Writing "0" (the calling thread) to the group's `tasks` file
    skips that lock; this process has a single thread (the zygote starts none), so moving
    the thread moves the whole process, and every process it forks later starts there.
    """
    tasks = os.path.join(os.path.dirname(procs), "tasks")
    if os.path.basename(procs) == "cgroup.procs" and threading.active_count() == 1 and os.path.exists(tasks):
        path, value = tasks, "0"
    else:
        path, value = procs, str(os.getpid())
    with open(path, "w") as f:
        f.write(value)


def _load_app(app):
    module, _, attr = app.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError("%s is not callable" % app)
    return obj


def worker_main(chan_fd, zygote_socks):
    """Runs in the forked child; never returns."""
    roost_worker.mark("forked")
    code = 1
    try:
        code = _worker(chan_fd, zygote_socks)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _worker(chan_fd, zygote_socks):
    for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_DFL if s != signal.SIGPIPE else signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # The zygote's sockets must never be closed through these objects (their fd numbers
    # are about to be reused).
    for s in zygote_socks:
        s.detach()
    chan = socket.socket(fileno=chan_fd)
    data, fds, _, _ = socket.recv_fds(chan, MAX_SPEC, 2)
    chan.close()
    if not data:
        return 0  # the agent withdrew the request
    spec = json.loads(data)
    roost_worker.mark("spec")
    if len(fds) != 2:
        raise RuntimeError("expected the listening socket and the log file, got %d fds" % len(fds))
    listen_fd, log_fd = _high(fds[0]), _high(fds[1])
    lifeline_fd = _high(os.dup(LIFELINE_FD))

    # 1. The site's cgroups, before anything else runs or allocates.
    for path in spec["cgroup_procs"]:
        _join_cgroup(path)
    roost_worker.mark("cgroup")
    # 2. A session of its own: the agent signals the worker's whole tree as -pid.
    os.setsid()
    # 3. Privileges: groups, gid, uid; then no way back.
    os.setgroups(spec["groups"])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    os.umask(0o027)
    # 4. fds: 0 /dev/null, 1-2 the site's log, 3 the socket, 4 the lifeline; nothing else.
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = _high(os.open("/dev/null", os.O_RDWR))
    for src, dst in ((devnull, 0), (log_fd, 1), (log_fd, 2), (listen_fd, LISTEN_FD), (lifeline_fd, WORKER_LIFELINE_FD)):
        os.dup2(src, dst, inheritable=dst < 3)
    os.closerange(WORKER_LIFELINE_FD + 1, 1 << 20)
    # 5. The site's environment and nothing else.
    os.environ.clear()
    for k, v in spec["env"]:
        os.environ[k] = v
    os.environ["LISTEN_PID"] = str(os.getpid())
    # 6. The site's directory, entered as the user.
    os.chdir(spec["dir"])
    host = spec["host"]
    set_name("roost:" + host)
    sys.argv = ["roost-worker", host]
    roost_worker.mark("setup")
    _setup_path(spec["dir"], spec.get("virtualenv"))
    gc.enable()
    # 7. The app.
    app = _load_app(spec["app"])
    roost_worker.mark("import")
    # 8. Serve.
    roost_worker.serve(app, spec)
    return 0


# --- the zygote ------------------------------------------------------------------------------


def preload(modules):
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as e:  # a missing or broken module never stops the zygote
            log("preload %s: skipped (%s: %s)" % (name, type(e).__name__, e))
        else:
            log("preloaded %s" % name)


# A spare: a child forked ahead of time that waits, still unspecialised, for a fork
# request to hand it its channel; the request then costs a message instead of a fork (the
# fork, ~3 ms here, is made after the handover, once the zygote has been idle a moment).
# It holds no site data and no fd but stdio, the lifeline and its socket to the zygote.
SPARE_AFTER_IDLE_MS = 30


class Spare:
    def __init__(self, pid, pidfd, sock):
        self.pid, self.pidfd, self.sock = pid, pidfd, sock


def make_spare(control, events):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    try:
        pid = os.fork()
        if pid == 0:
            ours.close()  # the child's copy: EOF reaches the spare when the zygote goes
            spare_main(theirs, (control, events))
        theirs.close()
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        return Spare(pid, pidfd, ours)
    except OSError as e:
        log("cannot fork a spare: %s" % e)
        ours.close()
        theirs.close()
        return None
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])


def spare_main(sock, zygote_socks):
    """A spare's life until a request hands it a channel; never returns."""
    try:
        for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
        for s in zygote_socks:
            s.detach()
        os.close(CONTROL_FD)
        os.close(EVENTS_FD)
        set_name("roost-spare")
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        msg, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        if not msg or len(fds) != 1:
            os._exit(0)  # the zygote is gone (or never needed this spare)
        roost_worker.start_timeline(json.loads(msg)["t"])
        sock.close()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    worker_main(fds[0], ())


def main():
    modules = json.loads(sys.argv[1]) if len(sys.argv) > 1 else []
    set_name("roost-zygote")
    control = socket.socket(fileno=CONTROL_FD)
    events = socket.socket(fileno=EVENTS_FD)
    events.setblocking(False)
    preload(modules)
    # Everything imported so far is shared, copy-on-write, with every worker: keep the
    # collector from touching (and so copying) it.
    gc.collect()
    gc.freeze()
    gc.disable()

    def reap(_sig=None, _frame=None):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            try:
                events.send(json.dumps({"pid": pid, "status": status_text(status)}).encode())
            except OSError:
                pass  # the agent is not listening; its pidfd still tells it the worker exited

    signal.signal(signal.SIGCHLD, reap)
    poller = select.poll()
    poller.register(CONTROL_FD, select.POLLIN)
    poller.register(LIFELINE_FD, select.POLLIN)
    spare = make_spare(control, events)
    log("ready (python %s, pid %d)" % (sys.version.split()[0], os.getpid()))
    while True:
        ready = poller.poll(None if spare else SPARE_AFTER_IDLE_MS)
        if not ready:
            spare = make_spare(control, events)
            continue
        for fd, _ in ready:
            if fd == LIFELINE_FD:
                log("the agent is gone; exiting")
                return 0
            try:
                msg, fds, _, _ = socket.recv_fds(control, 4096, 1)
            except InterruptedError:
                continue
            if not msg:
                log("control socket closed; exiting")
                return 0
            req = json.loads(msg)
            if req.get("op") != "fork" or len(fds) != 1:
                for fd_ in fds:
                    os.close(fd_)
                control.send(json.dumps({"id": req.get("id"), "error": "bad request"}).encode())
                continue
            spare = fork(control, events, req["id"], fds[0], spare)


def fork(control, events, req_id, chan_fd, spare):
    """Answer a fork request: hand the channel to the spare, or fork a child for it.
    Returns the spare that is left (None: make a new one when idle)."""
    t = time.perf_counter()
    if spare is not None:
        try:
            socket.send_fds(spare.sock, [json.dumps({"t": t}).encode()], [chan_fd])
        except OSError:
            handed = False  # the spare died; fork instead
        else:
            handed = True
        spare.sock.close()
        if handed:
            os.close(chan_fd)
            fds = [spare.pidfd] if spare.pidfd is not None else []
            try:
                socket.send_fds(control, [json.dumps({"id": req_id, "pid": spare.pid}).encode()], fds)
            finally:
                for fd in fds:
                    os.close(fd)
            return None
        if spare.pidfd is not None:
            os.close(spare.pidfd)
    sys.stdout.flush()
    sys.stderr.flush()
    # No reaping between fork and pidfd_open: the pid can't be recycled under the pidfd.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    try:
        roost_worker.start_timeline(t)
        pid = os.fork()
        if pid == 0:
            worker_main(chan_fd, (control, events))
        os.close(chan_fd)
        fds = []
        try:
            fds.append(os.pidfd_open(pid))
        except (AttributeError, OSError):
            pass  # the agent opens one itself
        socket.send_fds(control, [json.dumps({"id": req_id, "pid": pid}).encode()], fds)
        for fd in fds:
            os.close(fd)
    except OSError as e:
        try:
            control.send(json.dumps({"id": req_id, "error": "fork: %s" % e}).encode())
        except OSError:
            pass
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])


if __name__ == "__main__":
    sys.exit(main())

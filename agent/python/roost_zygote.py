"""Roost's zygote: a fork server for one Python interpreter (DESIGN.md, decision 4).

The agent starts one per base interpreter, as root, with:

    fd 3  control   SOCK_SEQPACKET: the agent asks for a fork, sending the child's channel;
                    the answer on that channel is the child's pid and a pidfd for it
                    (SCM_RIGHTS), from the spare that took the request, else the zygote
    fd 4  events    SOCK_SEQPACKET: the zygote reports each child's exit status
    fd 5  lifeline  the read end of a pipe whose write end only the agent holds

It imports the WSGI server and the modules the operator lists, forks a spare (a child that
waits, unspecialised, to be handed a request), then waits. It never sees a
site's code, files, environment or privilege: a fork request carries one fd, a fresh
socket whose other end the agent keeps. The child reads its site's cgroups, then its spec
(and its listening socket and log file) from that socket itself, after the fork, so no
site's data ever passes through the zygote's memory, which every later worker inherits.

The child, in an order that leaves nothing behind: joins the site's cgroups, starts a new
session, sets its supplementary groups, gid and uid, no-new-privs and umask 027, keeps only
fd 0 (/dev/null), 1 and 2 (the site's log), 3 (the listening socket) and 4 (the lifeline),
replaces its environment with the site's, enters the site's directory as the user, puts it
and its virtualenv's site-packages on sys.path, imports the app and serves it on the
inherited socket with `roost_worker.serve` (no arbiter: `threads` threads sharing one epoll
set, each answering the requests it is woken for). Workers outlive the zygote;
they stop when the agent goes away (EOF on the lifeline, watched by the server's own loop).
"""

import ctypes
import gc
import importlib
import importlib.machinery
import importlib.util
import io
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
# In a worker, until its first response: the channel the agent sent its spec on, for the
# report of the modules it imported (issue 14).
REPORT_FD = 5
MAX_SPEC = 1 << 20
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38
EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)

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
    # os.open/os.write, not open(): no buffer, no encoder, no isatty probe (5 hierarchies on
    # v1, on the cold path).
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _defer_bytecode_writes():
    """Until the first response, keep the bytecode files a site's first import would write
    (its `__pycache__` directory and a file per module: three new inodes, ~0.35 ms of a
    never-started hello-world site's first response on ext4 here); returns what writes
    them, unchanged, afterwards. A site whose bytecode is current writes none either way."""
    import importlib.machinery

    loader = importlib.machinery.SourceFileLoader
    write = loader.set_data
    kept = []

    def keep(self, path, data, *, _mode=0o666):
        kept.append((self, path, data, _mode))

    def write_kept():
        loader.set_data = write
        for self, path, data, mode in kept:
            write(self, path, data, _mode=mode)
        kept.clear()

    loader.set_data = keep
    return write_kept


def _then(first, second):
    def both():
        first()
        second()

    return both


def _import_from_site_dir(module, site_dir):
    """The site's top-level module `module`, loaded straight from `site_dir/module.py`
    when that is what the import system would find first (the site's directory leads
    `sys.path`): no package or extension module of that name beside it, none imported
    already. None otherwise. Issue 14: the import system's search (its finders, path
    hooks and a finder made for the new directory) was a third of a never-started site's
    import, ~0.1 ms cold."""
    if "." in module or module in sys.modules:
        return None
    try:
        names = set(os.listdir(site_dir))
    except OSError:
        return None
    source = module + ".py"
    if source not in names or module in names or any(module + s in names for s in EXTENSION_SUFFIXES):
        return None
    path = os.path.join(site_dir, source)
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location(module, path)
    obj = importlib.util.module_from_spec(spec)
    sys.modules[module] = obj
    try:
        if "__pycache__" in names or sys.pycache_prefix is not None:
            spec.loader.exec_module(obj)
        else:
            exec(_compile_fresh(spec.loader, module, path), obj.__dict__)
    except BaseException:
        sys.modules.pop(module, None)
        raise
    return sys.modules[module]


def _compile_fresh(loader, module, path):
    """The code of a module never compiled where it lives (no `__pycache__` beside it),
    compiled as its loader would compile it, without the loader's look for bytecode that
    cannot be there (the cache path's arithmetic, a failed open and its exception) and
    without marshalling the bytecode to write: ~0.2 ms of a never-started site's import,
    cold (issue 14). The loader writes that bytecode after the first response."""
    with io.open_code(path) as f:
        source = f.read()
    code = compile(source, path, "exec", dont_inherit=True)
    roost_worker.after_first_response = _then(roost_worker.after_first_response, lambda: _write_bytecode(loader, module))
    return code


def _write_bytecode(loader, module):
    """After the first response: the bytecode `_compile_fresh` left out, written by the
    loader (it compiles the source again, off the first response's path)."""
    try:
        loader.get_code(module)
    except Exception:
        pass  # a module that changed into one that no longer compiles: no cache, as in import


PREWARM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prewarm")
PREWARM_MODULE = "roost_prewarm_app"


def _rehearse_import():
    """In a spare, while it waits: import a hello-world module the way a never-started
    site's app is imported (`_import_from_site_dir`), then forget it, so the copy-on-write
    faults of that path (module, compile, functions: ~40, at ~4 us each here) are paid
    ahead. The module is root's, beside this script (the agent installs it)."""
    after = roost_worker.after_first_response
    try:
        _import_from_site_dir(PREWARM_MODULE, PREWARM_DIR)
    except Exception:
        pass  # a walk that fails only leaves its faults to the first request
    finally:
        sys.modules.pop(PREWARM_MODULE, None)
        roost_worker.after_first_response = after  # no bytecode written for it


def _load_app(app, site_dir=None):
    module, _, attr = app.partition(":")
    obj = _import_from_site_dir(module, site_dir) if site_dir else None
    if obj is None:
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


# What a spare did ahead of its worker's specialisation (`_prepare_ahead`), else None.
_AHEAD = None


class _Ahead:
    __slots__ = ("devnull", "lifeline")

    def __init__(self, devnull, lifeline):
        self.devnull, self.lifeline = devnull, lifeline


def _reset_signals():
    for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_DFL if s != signal.SIGPIPE else signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _prepare_ahead():
    """In a spare, once it has walked the request path: the part of a worker's
    specialisation that is the same for every site, done while it waits rather than on a
    cold start's path (issue 14: in a worker woken cold, these few calls took 0.2-0.3 ms).
    A spare becomes a worker and nothing else (`serve_forks` forks probes and framework
    zygotes afresh), so none of this reaches a zygote. Returns what `_worker` then skips."""
    # Signals: `spare_main` reset them first thing (the zygote handles SIGCHLD only).
    roost_worker.signals_at_default = True
    # Its own session: the agent signals a worker's whole tree as -pid.
    os.setsid()
    # The zygote's two variables (PATH, LANG): the worker's environment is the site's alone.
    os.environ.clear()
    ahead = _Ahead(_high(os.open("/dev/null", os.O_RDWR)), _high(os.dup(LIFELINE_FD)))
    roost_worker.after_first_response = _then(roost_worker.after_first_response, _defer_bytecode_writes())
    # Back to nice 0 now: nothing runs until a request comes, and then it is a cold start's
    # path (at the zygote's nice 10, every thread the start wakes preempted it). Whatever
    # the boot weight, a group joined governs the worker from then on.
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except PermissionError:
        pass
    return ahead


def _worker(chan_fd, zygote_socks):
    ahead = _AHEAD
    if ahead is None:
        _reset_signals()
    # The zygote's sockets must never be closed through these objects (their fd numbers
    # are about to be reused).
    for s in zygote_socks:
        s.detach()
    chan = socket.socket(fileno=chan_fd)
    # Two messages: the site's cgroups as soon as they exist, then (while this process joins
    # them) the spec with the listening socket and the log.
    data, _, _, _ = socket.recv_fds(chan, MAX_SPEC, 0)
    if not data:
        return 0  # the agent withdrew the request
    # 1. The site's cgroups, before anything else runs or allocates (a spare that joined a
    # group made ahead is in them already: the agent renamed that group to the site's).
    cgroups = json.loads(data)
    if not cgroups.get("joined"):
        for path in cgroups["cgroup_procs"]:
            _join_cgroup(path)
    # The zygote runs below normal priority (agent/src/launch/priority.rs); its worker, once
    # in its site's cgroup, is back to normal, while it is still root and can (a spare is
    # already). Without CAP_SYS_NICE (the agent warned at its start) it keeps the zygote's
    # nice.
    if ahead is None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except PermissionError:
            pass
    roost_worker.mark("cgroup")
    data, fds, _, _ = socket.recv_fds(chan, MAX_SPEC, 2)
    report_fd = _high(chan.detach())  # fd 5 below: the module report (issue 14)
    if not data:
        return 0  # the agent withdrew the request
    spec = json.loads(data)
    roost_worker.mark("spec")
    if len(fds) != 2:
        raise RuntimeError("expected the listening socket and the log file, got %d fds" % len(fds))
    listen_fd, log_fd = _high(fds[0]), _high(fds[1])
    if ahead is None:
        lifeline_fd = _high(os.dup(LIFELINE_FD))
        # 2. A session of its own: the agent signals the worker's whole tree as -pid.
        os.setsid()
    else:
        lifeline_fd = ahead.lifeline
    # 3. Privileges: groups, gid, uid; then no way back.
    os.setgroups(spec["groups"])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    os.umask(0o027)
    # 4. fds: 0 /dev/null, 1-2 the site's log, 3 the socket, 4 the lifeline, 5 the module
    # report (closed after the first response); nothing else.
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = _high(os.open("/dev/null", os.O_RDWR)) if ahead is None else ahead.devnull
    for src, dst in ((devnull, 0), (log_fd, 1), (log_fd, 2), (listen_fd, LISTEN_FD), (lifeline_fd, WORKER_LIFELINE_FD), (report_fd, REPORT_FD)):
        os.dup2(src, dst, inheritable=dst < 3)
    os.closerange(REPORT_FD + 1, 1 << 20)
    # 5. The site's environment and nothing else.
    if ahead is None:
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
    # 7. The app (its bytecode files written after the first response).
    if ahead is None:
        roost_worker.after_first_response = _then(roost_worker.after_first_response, _defer_bytecode_writes())
    app = _load_app(spec["app"], spec["dir"])
    roost_worker.mark("import")
    # 8. Serve.
    roost_worker.serve(app, spec)
    return 0


# --- learning: which of the interpreter's modules a site imported (issue 14) -------------------
#
# After its first response a worker tells the agent, on its spec channel (fd 5), which
# modules it imported that come from the interpreter's own, root-owned paths: the stdlib and
# the system's dist-packages, never the site's directory or virtualenv. The agent groups the
# reports into framework sets and starts a framework zygote for a set that several sites
# share. The report comes from tenant code: the agent checks it, and every module goes
# through a probe (below) before a zygote imports it.

# The base zygote's modules (set in main): a worker reports only what it added to them.
BASE_MODULES = frozenset()
# (directory, kind) of the interpreter's own sys.path under -I, longest first; kind is
# "third_party" for dist-/site-packages, else "stdlib".
ROOT_PATHS = ()
REPORT_MAX_MODULES = 2000
REPORT_MAX_BYTES = 60000


def _root_paths():
    out = []
    for p in sys.path:
        if not p or not os.path.isabs(p):
            continue
        p = os.path.normpath(p)
        kind = "third_party" if os.path.basename(p) in ("dist-packages", "site-packages") else "stdlib"
        out.append((p + "/", kind))
    out.sort(key=lambda e: -len(e[0]))
    return tuple(out)


def _kind_of(path):
    for prefix, kind in ROOT_PATHS:
        if path.startswith(prefix):
            return kind
    return None


def _importable_name(name):
    """A dotted name of identifiers: what the agent accepts (a few modules are loaded under
    other names, e.g. `_sysconfigdata__x86_64-linux-gnu`; they are not worth preloading)."""
    return name.isascii() and all(part.isidentifier() for part in name.split("."))


def imported_modules():
    """{"third_party": [...], "stdlib": [...]}: modules this process imported beyond the
    base zygote's, from the interpreter's own paths, in import order."""
    found = {"third_party": [], "stdlib": []}
    for name, mod in list(sys.modules.items()):
        if name in BASE_MODULES or mod is None or not _importable_name(name):
            continue
        path = getattr(mod, "__file__", None)
        if not isinstance(path, str):
            continue  # built in, or a namespace package: nothing to preload
        kind = _kind_of(os.path.normpath(path))
        if kind is not None:
            found[kind].append(name)
    return found


def report_modules():
    """Runs once in a worker after its first response (roost_worker's hook): send the report,
    bounded, and close the channel."""
    try:
        found = imported_modules()
        for kind in found:
            found[kind] = found[kind][:REPORT_MAX_MODULES]
        msg = json.dumps(found, separators=(",", ":")).encode()
        while len(msg) > REPORT_MAX_BYTES:  # very large apps: keep the start of each list
            for kind in found:
                found[kind] = found[kind][: len(found[kind]) * 3 // 4]
            msg = json.dumps(found, separators=(",", ":")).encode()
        s = socket.socket(fileno=os.dup(REPORT_FD))
        try:
            s.send(msg)
        finally:
            s.close()
    except OSError:
        pass  # the agent stopped listening (it reads one report per worker)
    except Exception as e:  # the site's own sys.modules may hold anything; never fail a request
        log("module report skipped: %s: %s" % (type(e).__name__, e))
    finally:
        try:
            os.close(REPORT_FD)
        except OSError:
            pass


# --- probes and framework zygotes ----------------------------------------------------------------
#
# A probe is a child of the base zygote (root, like it, with no site's anything) that imports
# candidate modules one by one and watches each import: a module that fails, starts a thread,
# leaves a new fd open, creates a socket or reads a settings variable from the environment is
# left out, with everything its import brought in (removed from sys.modules, so a later module
# that needs it imports it again and is judged by the same effects). Only modules whose files
# lie under the interpreter's own paths, owned by root and writable by no one else, are
# imported at all. The probe answers with the modules it kept, and exits.

SETTINGS_MARKERS = ("SETTINGS", "_CONFIG")


def _owned_by_root(path):
    """`path` and every directory above it are root's and writable only by root."""
    p = os.path.normpath(path)
    while True:
        try:
            st = os.lstat(p)
        except OSError:
            return False
        if st.st_uid != 0 or st.st_mode & 0o022:
            return False
        if p == "/":
            return True
        p = os.path.dirname(p)


def _origin_problem(name):
    """Why `name` may not be imported by root, or None. Its parents are imported already."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except BaseException as e:
        return "import_error", "%s: %s" % (type(e).__name__, e)
    if spec is None:
        return "import_error", "not found"
    places = [spec.origin] if spec.has_location and spec.origin else list(spec.submodule_search_locations or [])
    if not places:
        return "not_root_owned", "no file (%s)" % (spec.origin,)
    for place in places:
        real = os.path.realpath(place)
        if _kind_of(real) is None or not _owned_by_root(real):
            return "not_root_owned", "%s is outside the interpreter's root-owned paths" % place
    return None


class _Watch:
    """What one import did: threads, fds, sockets, environment reads."""

    env_reads = []
    sockets = 0

    @classmethod
    def install(cls):
        """Watch the environment and socket creation; returns the function that stops it
        (a framework zygote must not pass the watch on to its workers)."""
        environ_type = type(os.environ)
        getitem, init = environ_type.__getitem__, socket.socket.__init__

        def watched_getitem(self, key):
            cls.env_reads.append(key)
            return getitem(self, key)

        def watched_init(self, *a, **kw):
            cls.sockets += 1
            init(self, *a, **kw)

        environ_type.__getitem__ = watched_getitem
        socket.socket.__init__ = watched_init

        def restore():
            environ_type.__getitem__ = getitem
            socket.socket.__init__ = init

        return restore

    def __init__(self):
        self.fds = set(os.listdir("/proc/self/fd"))
        self.tasks = len(os.listdir("/proc/self/task"))
        _Watch.env_reads = []
        _Watch.sockets = 0

    def problem(self):
        settings = sorted({k for k in _Watch.env_reads if isinstance(k, str) and any(m in k.upper() for m in SETTINGS_MARKERS)})
        if settings:
            return "reads_settings", "reads %s from the environment" % ", ".join(settings)
        if len(os.listdir("/proc/self/task")) > self.tasks:
            return "starts_thread", "started a thread"
        if _Watch.sockets:
            return "opens_socket", "created a socket"
        new = set(os.listdir("/proc/self/fd")) - self.fds
        # (listdir's own fd is in both lists, at the same number unless the import kept one)
        if new:
            targets = []
            for fd in sorted(new):
                try:
                    targets.append(os.readlink("/proc/self/fd/" + fd))
                except OSError:
                    pass
            return "opens_fd", "left fds open (%s)" % ", ".join(targets)
        return None


def probe_modules(modules):
    """Import `modules` in order, in this (throwaway) process; returns (kept, left_out), with
    left_out a list of {"module", "reason", "detail"}."""
    import importlib

    restore = _Watch.install()
    try:
        return _probe_each(modules, importlib)
    finally:
        restore()
        _Watch.env_reads = []


def _probe_each(modules, importlib):
    kept, left_out, refused = [], [], set()
    for name in modules:
        parent = name.rpartition(".")[0]
        while parent:
            if parent in refused:
                break
            parent = parent.rpartition(".")[0]
        if parent:
            refused.add(name)
            continue  # its package was left out: so is it (not reported again)
        if name in sys.modules:
            kept.append(name)  # imported by an earlier module, which passed
            continue
        before = set(sys.modules)
        problem = _origin_problem(name)
        if problem is None:
            watch = _Watch()
            error = None
            try:
                importlib.import_module(name)
            except BaseException as e:
                error = "import_error", "%s: %s" % (type(e).__name__, str(e)[:200])
            effect = watch.problem()
            # A failure that came from reading settings is reported as that.
            problem = effect if effect and (error is None or effect[0] == "reads_settings") else error
        if problem is None:
            kept.append(name)
            continue
        refused.add(name)
        left_out.append({"module": name, "reason": problem[0], "detail": problem[1]})
        for m in set(sys.modules) - before:
            del sys.modules[m]
    return kept, left_out


def _receive_request(chan_fd, max_fds):
    chan = socket.socket(fileno=chan_fd)
    data, fds, _, _ = socket.recv_fds(chan, MAX_SPEC, max_fds)
    if not data:
        os._exit(0)  # the agent withdrew the request
    return chan, json.loads(data), fds


def probe_main(chan_fd, zygote_socks):
    """A probe's life; never returns."""
    code = 1
    try:
        for s in zygote_socks:
            s.detach()
        set_name("roost-probe")
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        chan, req, _ = _receive_request(chan_fd, 0)
        kept, left_out = probe_modules(req["modules"])
        paths = [p.rstrip("/") for p, _ in ROOT_PATHS]  # the agent's fingerprint of them
        chan.send(json.dumps({"kept": kept, "left_out": left_out, "paths": paths}).encode())
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def framework_main(chan_fd, zygote_socks):
    """A framework zygote: imports its framework's modules (all probed already), checks that
    this left no thread and no fd behind, then serves fork requests like the base zygote, on
    the control and events sockets the agent sent with the request. Never returns."""
    code = 1
    try:
        for s in zygote_socks:
            s.detach()
        set_name("roost-zygote-fw")
        # Out of the way of fds 3 and 4 first (a spare closed them: the channel may be 3).
        chan, req, fds = _receive_request(_high(chan_fd), 2)
        if len(fds) != 2:
            raise RuntimeError("expected the control and events sockets, got %d fds" % len(fds))
        control, events = _high(fds[0]), _high(fds[1])
        os.dup2(control, CONTROL_FD)
        os.dup2(events, EVENTS_FD)
        for fd in os.listdir("/proc/self/fd"):
            if int(fd) > LIFELINE_FD and int(fd) != chan.fileno():
                try:
                    os.close(int(fd))
                except OSError:
                    pass
        watch = _Watch()
        kept, left_out = probe_modules(req["modules"])
        problem = watch.problem() if not left_out else ("changed", "%d modules failed again" % len(left_out))
        if problem is not None:
            chan.send(json.dumps({"error": "%s: %s" % problem, "left_out": left_out}).encode())
            return
        gc.collect()
        gc.freeze()  # shared copy-on-write with every worker, as in the base zygote
        chan.send(json.dumps({"ready": True, "modules": len(kept)}).encode())
        chan.close()
        log("framework zygote ready: %d modules (%s)" % (len(kept), ", ".join(req.get("packages", []))))
        code = serve_forks(socket.socket(fileno=CONTROL_FD), socket.socket(fileno=EVENTS_FD))
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


CHILD_ROLES = {"worker": worker_main, "probe": probe_main, "framework": framework_main}


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
# The zygote passes the request on as it came; the spare checks it and answers it.
# It holds no site data and no fd but stdio, the lifeline and its socket to the zygote.
SPARE_AFTER_IDLE_MS = 30


class Spare:
    def __init__(self, pid, pidfd, sock, group=None):
        self.pid, self.pidfd, self.sock = pid, pidfd, sock
        # The cgroup the agent gave it to join while it waits (`spare-cgroup`), if any.
        self.group = group
        # Whether the agent holds a copy of `sock` (`announce`): then the agent sends the
        # spare its fork request itself, and this zygote never hands it over.
        self.announced = False

    def close(self):
        self.sock.close()
        if self.pidfd is not None:
            os.close(self.pidfd)


def announce(spare, events):
    """Give the agent a copy of the spare's socket and its pid (agent/src/launch/spare.rs):
    a worker's fork request then goes to the spare directly, answered already, without
    waking this zygote (issue 14: the zygote's wake-up and handover, then the spare's
    answer, were 0.5 ms of a cold start)."""
    try:
        socket.send_fds(events, [json.dumps({"spare": spare.pid}).encode()], [spare.sock.fileno()])
    except OSError as e:
        log("cannot give the agent the spare's socket (it is handed over here instead): %s" % e)
    else:
        spare.announced = True


def make_spare(control, events, group=None):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    try:
        pid = os.fork()
        if pid == 0:
            ours.close()  # the child's copy: EOF reaches the spare when the zygote goes
            spare_main(theirs, (control, events), group)
        theirs.close()
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        return Spare(pid, pidfd, ours, group and json.loads(group)["name"])
    except OSError as e:
        log("cannot fork a spare: %s" % e)
        ours.close()
        theirs.close()
        return None
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])


def rehearse_handover():
    """Walk the handover's path once on throwaway socket pairs, right after a spare's fork.

    The fork leaves every page of the zygote shared, copy-on-write, with the spare, so the
    next request's handover (the socket code and the refcounts of everything it touches)
    would copy those pages first, on a cold start's path. Walked now, while idle, they are
    the zygote's own again.
    """
    req_a, req_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    spare_a, spare_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        request = json.dumps({"op": "fork", "id": 0, "role": "worker"}).encode()
        socket.send_fds(req_a, [request], [spare_a.fileno()])
        msg, fds, _, _ = socket.recv_fds(req_b, 4096, 1)
        handed = hand_over(Spare(0, os.dup(fds[0]), socket.socket(fileno=os.dup(spare_a.fileno()))), msg, fds[0])
        _, passed, _, _ = socket.recv_fds(spare_b, 4096, 1)
        for fd in passed:
            os.close(fd)
        if not handed:
            os.close(fds[0])
    except OSError as e:
        log("cannot rehearse a handover: %s" % e)
    finally:
        for s in (req_a, req_b, spare_a, spare_b):
            s.close()


def _rehearse_answer():
    """A spare's answer to a fork request (parse it, open a pidfd on itself, send both),
    walked on a throwaway socket pair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        req = json.loads(json.dumps({"op": "fork", "id": 0, "role": "worker"}))
        try:
            pidfd = [os.pidfd_open(os.getpid())]
        except (AttributeError, OSError):
            pidfd = []
        _answer(ours.fileno(), {"id": req["id"], "pid": os.getpid()}, pidfd)
        for fd in socket.recv_fds(theirs, 4096, 1)[1]:
            os.close(fd)
    except OSError:
        pass  # a walk that fails only leaves its faults to the handover
    finally:
        ours.close()
        theirs.close()


def _settled(sock, joined, offered):
    """Tell whoever holds the other end (the agent, when the zygote gave it a copy) that
    this spare is ready, and in which group made ahead: what the answer to a fork request
    would say, so the agent can send one that needs none."""
    try:
        sock.send(json.dumps({"settled": True, "cgroup": joined, "cgroup_offered": offered}).encode())
    except OSError:
        pass  # nobody will send a request to this spare without an answer


def _join_spare_group(grant):
    """Join the cgroup the agent made ahead for this spare (cgroup v1: `tasks`, \"0\", cheap
    for a process moving itself); its name if every hierarchy took it, else None."""
    try:
        for path in grant["cgroup_procs"]:
            _join_cgroup(path)
    except OSError as e:
        log("spare: cannot join %s: %s" % (grant.get("name"), e))
        return None
    return grant["name"]


def spare_main(sock, zygote_socks, group=None):
    """A spare's life until a request hands it a channel; never returns. `group`: the
    agent's `spare-cgroup` message, if the zygote had one for it."""
    global _AHEAD
    offered = joined = None
    try:
        # A worker's signals from the start (the zygote's SIGCHLD handler is not a spare's).
        _reset_signals()
        for s in zygote_socks:
            s.detach()
        os.close(CONTROL_FD)
        os.close(EVENTS_FD)
        set_name("roost-spare")
        # A group the agent made ahead, joined while idle: the worker it becomes then has
        # no cgroup to join (issue 14; cgroup v1 only, where the agent can rename it).
        if group is not None:
            grant = json.loads(group)
            offered, joined = grant["name"], _join_spare_group(grant)
        # While it waits: the copy-on-write faults of the request path, and of answering
        # the fork request, paid ahead.
        roost_worker.prewarm()
        _rehearse_import()
        _rehearse_answer()
        _AHEAD = _prepare_ahead()
        _settled(sock, joined, offered)
        while True:
            msg, fds, _, _ = socket.recv_fds(sock, 4096, 1)
            if not msg:
                os._exit(0)  # the zygote is gone (or never needed this spare)
            if fds:
                break
            grant = json.loads(msg)  # a group given after this spare was made
            if grant.get("op") == "spare-cgroup" and offered is None:
                offered, joined = grant["name"], _join_spare_group(grant)
                _settled(sock, joined, offered)
        if len(fds) != 1:
            os._exit(0)
        # The request as the agent sent it: this process answers it, unless the agent
        # knows the answer (a request sent to this spare directly: spare.rs).
        t = time.perf_counter()
        sock.close()
        req = json.loads(msg)
        if req.get("answered") is True and req.get("op") == "fork" and req.get("role") == "worker":
            roost_worker.start_timeline(t)
            worker_main(fds[0], ())
        # Only a worker: this process is in a session of its own, with no environment.
        role = worker_main if req.get("op") == "fork" and req.get("role", "worker") == "worker" else None
        if role is None:
            _answer(fds[0], {"id": req.get("id"), "error": "bad request"})
            os._exit(0)
        try:
            pidfd = [os.pidfd_open(os.getpid())]
        except (AttributeError, OSError):
            pidfd = []  # the agent opens one itself
        _answer(fds[0], {"id": req["id"], "pid": os.getpid(), "cgroup": joined, "cgroup_offered": offered}, pidfd)
        roost_worker.start_timeline(t)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    role(fds[0], ())


def main():
    global BASE_MODULES, ROOT_PATHS
    modules = json.loads(sys.argv[1]) if len(sys.argv) > 1 else []
    set_name("roost-zygote")
    ROOT_PATHS = _root_paths()
    roost_worker.after_first_response = report_modules
    preload(modules)
    BASE_MODULES = frozenset(sys.modules)
    return serve_forks(socket.socket(fileno=CONTROL_FD), socket.socket(fileno=EVENTS_FD))


def serve_forks(control, events):
    """The fork server's loop (the base zygote's, and a framework zygote's); returns the
    exit code."""
    events.setblocking(False)
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
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    reap()  # children that ended before the handler was ours
    poller = select.poll()
    poller.register(CONTROL_FD, select.POLLIN)
    poller.register(LIFELINE_FD, select.POLLIN)

    def new_spare(group=None):
        made = make_spare(control, events, group)
        if made is not None:
            announce(made, events)
            # The spare closes its end once it has its request (or exits): that is how
            # this zygote learns that the agent used it.
            poller.register(made.sock.fileno(), select.POLLHUP)
        return made

    spare = new_spare()
    rehearse_handover()
    # A `spare-cgroup` from the agent for the next spare, kept until that one is made.
    granted = None
    log("ready (python %s, pid %d)" % (sys.version.split()[0], os.getpid()))
    while True:
        ready = poller.poll(None if spare else SPARE_AFTER_IDLE_MS)
        if not ready:
            spare = new_spare(granted)
            if spare is not None:
                granted = None
            rehearse_handover()
            continue
        for fd, _ in ready:
            if fd == LIFELINE_FD:
                log("the agent is gone; exiting")
                return 0
            if spare is not None and fd == spare.sock.fileno():
                poller.unregister(fd)
                spare.close()  # taken by the agent (or gone): the next one after a quiet spell
                spare = None
                continue
            if fd != CONTROL_FD:
                continue  # a spare closed before this zygote saw its hang-up
            try:
                msg, fds, _, _ = socket.recv_fds(control, 4096, 1)
            except InterruptedError:
                continue
            if not msg:
                log("control socket closed; exiting")
                return 0
            # A spare becomes a worker only: it is prepared as one (`_prepare_ahead`), and
            # may be in a group made ahead, where a probe or a framework zygote must not live.
            if spare is not None and not spare.announced and len(fds) == 1 and json.loads(msg).get("role", "worker") == "worker":
                poller.unregister(spare.sock.fileno())
                handed, spare = hand_over(spare, msg, fds[0]), None
                if handed:
                    continue
            req = json.loads(msg)
            if req.get("op") == "spare-cgroup" and not fds:
                if spare is not None and spare.group is None:
                    try:
                        spare.sock.send(msg)
                        spare.group = req["name"]
                    except OSError:
                        granted = msg  # the spare is gone: the next one gets it
                else:
                    granted = msg
                continue
            role = req.get("role", "worker")
            if req.get("op") != "fork" or len(fds) != 1 or role not in CHILD_ROLES:
                if fds:
                    _answer(fds[0], {"id": req.get("id"), "error": "bad request"})
                for fd_ in fds:
                    os.close(fd_)
                continue
            fork(control, events, req["id"], fds[0], role)


def hand_over(spare, msg, chan_fd):
    """Pass a fork request, as it came, and its channel to the spare, which checks and
    answers it itself: the zygote's part of a cold start is one message, no parsing.
    Whether it was handed over (False: the spare is gone; the caller forks instead)."""
    try:
        socket.send_fds(spare.sock, [msg], [chan_fd])
    except OSError:
        handed = False
    else:
        handed = True
        os.close(chan_fd)
    spare.close()
    return handed


def _answer(chan_fd, msg, fds=()):
    """Answer a fork request on the child's channel (the agent reads it from its end, so it
    can go on preparing the start meanwhile); closes the given fds."""
    try:
        socket.send_fds(socket.socket(fileno=os.dup(chan_fd)), [json.dumps(msg).encode()], list(fds))
    except OSError:
        pass  # the agent gave up on this request; the child reads EOF and exits
    finally:
        for fd in fds:
            os.close(fd)


def fork(control, events, req_id, chan_fd, role="worker"):
    """Answer a fork request that no spare took: fork a child for it, which becomes a
    worker, a probe or a framework zygote (`role`). The pid (and a pidfd) go back on the
    channel."""
    t = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    # No reaping between fork and pidfd_open: the pid can't be recycled under the pidfd.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    try:
        roost_worker.start_timeline(t)
        pid = os.fork()
        if pid == 0:
            CHILD_ROLES[role](chan_fd, (control, events))
        fds = []
        try:
            fds.append(os.pidfd_open(pid))
        except (AttributeError, OSError):
            pass  # the agent opens one itself
        _answer(chan_fd, {"id": req_id, "pid": pid}, fds)
    except OSError as e:
        _answer(chan_fd, {"id": req_id, "error": "fork: %s" % e})
    finally:
        os.close(chan_fd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])


if __name__ == "__main__":
    sys.exit(main())

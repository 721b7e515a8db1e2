/*
 * inject.c - run system calls inside another process with ptrace (x86_64).
 *
 * API (declarations to add to uffdio.h):
 *
 *   struct uf_syscall { long nr; long args[6]; long ret; };
 *
 *   Stop every thread of process `pid`, execute the n system calls calls[0..n-1] one after
 *   another in the context of one stopped thread of that process (ret = raw kernel return
 *   value, i.e. -errno on failure), then restore that thread's registers exactly, and detach
 *   from every thread, leaving the process running exactly as before.  The whole session
 *   happens inside this one call (ptrace requests must come from the thread that attached).
 *   Returns 0 on success (even if some injected syscalls returned errors) or -errno:
 *   -ESRCH no such process / it exited during the session, -EPERM not permitted or already
 *   traced by another tracer, -EINVAL bad arguments (also: pid is not a thread-group id, or
 *   is the caller itself), -ENOEXEC no usable syscall instruction found (also: the target is
 *   not a 64-bit process), other -errno from ptrace/waitid.  On any failure it still restores
 *   and detaches everything it attached.  calls[i].ret for calls that did not run is set to
 *   -ECANCELED.
 *
 *   int uf_inject(int pid, struct uf_syscall *calls, int n);
 *
 * Pseudo-call (not run in the target, needs no extra stop): nr = UF_CALL_RSEQ_AREAS (-1000),
 * args[0] = address of a uint64_t array in the CALLER's memory, args[1] = its capacity in
 * (start, length) pairs.  It stores the rseq area of every thread stopped for the session,
 * the injection thread's first; ret = how many threads have one (may exceed the capacity:
 * only that many are stored) or -errno (-EOPNOTSUPP: the kernel has no
 * PTRACE_GET_RSEQ_CONFIGURATION, Linux < 5.13).
 *
 * Pseudo-call nr = UF_CALL_UNLESS_RSEQ (-1001), args[0] = start, args[1] = length: if
 * [start, start + length) shares a page with the injection thread's rseq area, the NEXT call
 * is not run (its ret is -EDEADLK) and this one's ret is 1; otherwise ret is 0.  It guards a
 * call that takes pages away (see below) with what is true in this very session: a list
 * from an earlier session may be stale (a process just exec'd registers its rseq area
 * moments after it starts; a new thread may become the injection thread).
 *
 * Pseudo-call nr = UF_CALL_IF_SAME_FILE (-1002), args[0] = an fd of the target, args[1] =
 * an fd of the caller: ret 0 if both are the same open file (kcmp KCMP_FILE), else 1 (or
 * -errno, e.g. -EBADF: the target has no such fd) and every later call of the session is
 * cancelled (-ECANCELED, not run).  Checked while every thread is stopped, so the target
 * cannot exec between the check and the calls: a caller that holds a duplicate of a
 * close-on-exec fd it created in the target knows that the calls run in that same image
 * (not in a program the target exec'd since, whose fds and mappings are not the caller's).
 *
 * Why a caller may need them: between two injected calls the injection thread returns to
 * user space (it executes the borrowed `syscall` there), and on that way out the kernel
 * reads and writes the thread's rseq area (rseq notify-resume runs after every preemption,
 * and every ptrace stop is one).  If an injected call made the page of that area missing
 * in a userfaultfd-registered range (UFFDIO_MOVE, MADV_DONTNEED) and the fault handler
 * cannot resolve it before the session ends (say, it holds faults on pages being evicted
 * until the caller has read them, which it does after uf_inject() returns), the thread
 * waits in that kernel-mode fault forever and uf_inject() with it: a deadlock that no
 * ptrace request can break (only SIGKILL ends a kernel-mode userfaultfd wait).  Callers
 * that take pages away from the target must keep the pages of these areas resident
 * (UF_CALL_RSEQ_AREAS tells which; UF_CALL_UNLESS_RSEQ catches a stale list).  The same
 * holds for any other memory the kernel touches on the thread's behalf on the way out
 * (io_uring task_work copying into user buffers, for instance): keep it resident, or make
 * the call that removes it the last of its session.  And for the same reason, while such
 * faults are held, do not start another session: a thread waiting in a kernel-mode fault
 * cannot reach the ptrace stop that attaching waits for.
 *
 * How: PTRACE_SEIZE + PTRACE_INTERRUPT every thread (re-listing /proc/PID/task until no new
 * thread shows up), pick the thread-group leader (or any live thread), point its rip at an
 * existing `0f 05` (syscall) in an executable mapping (the vDSO first; we never write to the
 * target's code) and step it through syscall-entry and syscall-exit stops with PTRACE_SYSCALL.
 * During the session that thread has asynchronous signals blocked (PTRACE_SETSIGMASK), so
 * signals stay pending and are delivered natively afterwards; the few it still dequeues are
 * queued again before detaching.  Its registers are restored inside get_signal(), where the
 * kernel itself restarts an interrupted syscall (see restore_injection_thread()).  A thread
 * stopped inside an rseq critical section resumes at the section's abort handler, as the
 * kernel would have done.
 *
 * Stops are waited for by polling waitid(WNOHANG) - spinning for 30 us, then napping 10 us
 * doubling up to 1 ms - never by blocking in waitid(): see stolen_stop().
 *
 * Caller requirements and limits: no other thread of the calling process should wait for
 * the target during a session (waitpid(pid), waitpid(-1), wait(); Popen.wait()/poll(), asyncio
 * child watchers): the kernel hands it our ptrace stops.  uf_inject() notices a stolen stop
 * and goes on (stolen_stop()), but that waiter gets a bogus "stopped" status.  The call
 * blocks while a target thread cannot reach a ptrace stop (uninterruptible sleep, a vfork
 * parent until its child execs, a kernel-mode userfaultfd fault that nobody resolves) and
 * while an injected syscall blocks.  A seccomp filter or syscall user dispatch in the target
 * applies to injected calls too (the resulting SIGSYS is dropped; a KILL action kills the
 * target).  If the caller dies mid-session the target is left with our registers and will
 * likely crash.  If the leader thread exits exactly while being attached (pthread_exit race)
 * it stays a zombie traced by the calling thread until the process ends and the calling
 * thread exits.  x86_64 (64-bit and x32 targets) only; elsewhere uf_inject() is -ENOSYS.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>

struct uf_syscall {
	long nr;
	long args[6];
	long ret;
};


#ifndef __x86_64__
int uf_inject(int pid, struct uf_syscall *calls, int n)
{
	(void)pid;
	for (int i = 0; calls && i < n; i++)
		calls[i].ret = -ECANCELED;
	return -ENOSYS;
}
#else

/* Kernel-internal return values that only a tracer (or the restart logic) ever sees. */
#define UF_ERESTARTSYS 512
#define UF_ERESTARTNOINTR 513
#define UF_ERESTARTNOHAND 514
#define UF_ERESTART_RESTARTBLOCK 516

#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif
#ifndef PTRACE_GET_RSEQ_CONFIGURATION
#define PTRACE_GET_RSEQ_CONFIGURATION 0x420f
#endif

#define UF_CALL_RSEQ_AREAS (-1000) /* pseudo-calls: see the API above */
#define UF_CALL_UNLESS_RSEQ (-1001)
#define UF_CALL_IF_SAME_FILE (-1002)
#ifndef KCMP_FILE
#define KCMP_FILE 0
#endif

#define UF_USER_CS 0x33 /* __USER_CS: the thread runs 64-bit code */
#define UF_SYSCALL_STOP (SIGTRAP | 0x80)

enum { T_STOPPED, T_DEAD, T_GONE }; /* stopped & ours / zombie still traced by us / not ours */

struct thr {
	pid_t tid;
	int state;
	int sig; /* parked in a signal-delivery stop for this signal (0: PTRACE_EVENT_STOP) */
};

enum { W_SIGNAL, W_SYSCALL }; /* where the injection thread is parked (see finish()) */

struct sess {
	pid_t pid;
	int real_parent;        /* the caller is the target's parent: never reap its leader */
	struct thr *t;
	int nt, cap;
	int inj;                /* index of the injection thread, -1 if none */
	int moved;              /* the injection thread was resumed: its registers changed */
	int where;
	int prepared;           /* the injection thread was set up for calls (prepare()) */
	int rseq_known;         /* rseq_start/rseq_end hold its rseq area's pages ([0, 0): none) */
	unsigned long rseq_start, rseq_end;
	int masked;             /* its signal mask was replaced by `mask | async signals` */
	uint64_t mask;          /* its own signal mask (kernel sigset: bit n-1 = signal n) */
	int died;               /* the process was killed / exited during the session */
	unsigned long gadget;   /* address of a 0f 05 pair */
	unsigned long abort_ip; /* rseq abort handler to resume at, 0 if none */
	struct user_regs_struct saved;
	siginfo_t *sigs;        /* signals the injection thread dequeued during the session */
	int nsigs, capsigs;
};

/* ---- small helpers ------------------------------------------------------------ */

/* How long wait_stop() polls before it sleeps.  A tracee resumed with PTRACE_SYSCALL is back
 * in a stop within microseconds; if the tracer slept meanwhile, waking it costs a cross-CPU
 * wake-up, which in a VM can take 50-200 us per stop (measured: 100 calls went from ~20 ms
 * to ~6 ms mean with this). */
#define UF_SPIN_NS 30000

static long elapsed_ns(const struct timespec *t0)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (t.tv_sec - t0->tv_sec) * 1000000000L + (t.tv_nsec - t0->tv_nsec);
}

/* After spinning, wait_stop() polls with sleeps that double from UF_POLL_MIN_NS up to
 * UF_POLL_MAX_NS (see stolen_stop() for why it never blocks in waitid()). */
#define UF_POLL_MIN_NS 10000
#define UF_POLL_MAX_NS 1000000

/* Is `tid` in a ptrace stop whose report somebody else took?  Any thread of the caller's
 * process that waits for the tracee - waitpid(pid) or waitpid(-1) without __WNOTHREAD, as
 * subprocess.Popen.wait()/poll() and asyncio's child watchers do - is handed our ptrace
 * stops (the kernel reports a tracee's stops to every thread of its tracer's thread group),
 * and a blocking waitid() of ours would then wait forever.  A ptrace request succeeds only
 * on a tracee that is stopped; if it does and waitid() still has nothing to report, the
 * report was consumed: rebuild the status from the stop's siginfo. */
static int stolen_stop(pid_t tid, int *status)
{
	siginfo_t si;

	memset(&si, 0, sizeof(si));
	if (ptrace(PTRACE_GETSIGINFO, tid, 0, &si) < 0) {
		if (errno != EINVAL)
			return 0; /* ESRCH: running (or dead: waitid() says ECHILD) */
		*status = SIGSTOP | (PTRACE_EVENT_STOP << 8); /* a stop without siginfo */
		return 1;
	}
	if (si.si_signo == SIGTRAP && si.si_code == UF_SYSCALL_STOP)
		*status = UF_SYSCALL_STOP;
	else if (si.si_code > 0xff) /* PTRACE_EVENT_*: signo | event << 8 */
		*status = si.si_code;
	else
		*status = si.si_signo; /* signal-delivery stop */
	return 1;
}

/* waitid() without WEXITED: reports ptrace stops but never reaps.  A thread that died gives
 * ECHILD instead of waiting forever, which matters for a leader with sub-threads: its exit is
 * not reported until every other thread is reaped, and those are our (stopped) tracees.
 * It polls (WNOHANG) rather than blocks, so that a stop whose report another thread took
 * (stolen_stop()) is noticed. */
static int wait_stop(pid_t tid, int *status)
{
	struct timespec t0;
	siginfo_t si;
	long nap = 0;
	int spinning = 1;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		memset(&si, 0, sizeof(si));
		if (waitid(P_PID, (id_t)tid, &si, WSTOPPED | __WALL | __WNOTHREAD | WNOHANG) < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (si.si_pid)
			break;
		if (spinning && elapsed_ns(&t0) < UF_SPIN_NS) {
			__builtin_ia32_pause(); /* waitid takes tasklist_lock: do not hammer it */
			continue;
		}
		spinning = 0;
		if (stolen_stop(tid, status)) {
			/* ...unless it was reported in the meantime: then that report counts */
			memset(&si, 0, sizeof(si));
			if (waitid(P_PID, (id_t)tid, &si, WSTOPPED | __WALL | __WNOTHREAD | WNOHANG) == 0 &&
			    si.si_pid)
				break;
			return 0;
		}
		nap = nap ? (nap * 2 < UF_POLL_MAX_NS ? nap * 2 : UF_POLL_MAX_NS) : UF_POLL_MIN_NS;
		{
			struct timespec ts = { 0, nap };
			nanosleep(&ts, NULL);
		}
	}
	if (si.si_pid != tid || (si.si_code != CLD_TRAPPED && si.si_code != CLD_STOPPED))
		return -ECHILD;
	*status = si.si_status; /* signo | event << 8 | 0x80 for syscall stops */
	return 0;
}

/* A traced thread that died stays a zombie until its tracer reaps it; a zombie non-leader also
 * keeps the group leader's exit from being reported to the real parent. */
static void reap(pid_t tid)
{
	siginfo_t si;

	while (waitid(P_PID, (id_t)tid, &si, WEXITED | __WALL | __WNOTHREAD) < 0 && errno == EINTR)
		;
}

/* Reads a small /proc file into buf (NUL-terminated); returns its length or -errno. */
static ssize_t read_small(const char *path, char *buf, size_t size)
{
	ssize_t len, r;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	for (len = 0; (size_t)len < size - 1; len += r) {
		r = read(fd, buf + len, size - 1 - (size_t)len);
		if (r < 0 && errno == EINTR) {
			r = 0;
			continue;
		}
		if (r <= 0)
			break;
	}
	close(fd);
	buf[len] = 0;
	return len;
}

/* State letter of a thread ('Z', 'X', 'R'...), 0 if it is gone. */
static char thread_state(pid_t pid, pid_t tid)
{
	char path[64], buf[512], *p;

	snprintf(path, sizeof(path), "/proc/%d/task/%d/stat", pid, tid);
	if (read_small(path, buf, sizeof(buf)) <= 0)
		return 0;
	p = strrchr(buf, ')'); /* comm may contain spaces and parentheses */
	return p && p[1] == ' ' ? p[2] : 0;
}

static long status_field(const char *buf, const char *key)
{
	const char *p = strstr(buf, key);

	return p ? strtol(p + strlen(key), NULL, 10) : -1;
}

/* tid: a live thread.  Once the leader has exited, the process's memory is reachable only
 * through its other threads (/proc/PID/maps is empty, process_vm_readv(PID) fails). */
static ssize_t read_mem(pid_t tid, unsigned long addr, void *buf, size_t len)
{
	struct iovec local = { buf, len }, remote = { (void *)addr, len };
	ssize_t r = process_vm_readv(tid, &local, 1, &remote, 1, 0);

	return r < 0 ? -errno : r;
}

/* ---- attaching ------------------------------------------------------------------ */

static struct thr *find_thr(struct sess *s, pid_t tid)
{
	for (int i = 0; i < s->nt; i++)
		if (s->t[i].tid == tid)
			return &s->t[i];
	return NULL;
}

/* Seizes and interrupts one thread.  Returns 1 if it is now ours, 0 if it vanished, -errno. */
static int seize_one(struct sess *s, pid_t tid)
{
	if (s->nt == s->cap) {
		int cap = s->cap ? s->cap * 2 : 16;
		struct thr *t = realloc(s->t, (size_t)cap * sizeof(*t));
		if (!t)
			return -ENOMEM;
		s->t = t;
		s->cap = cap;
	}
	if (ptrace(PTRACE_SEIZE, tid, 0, (void *)(long)PTRACE_O_TRACESYSGOOD) < 0) {
		int e = errno;
		char st;
		if (e == ESRCH)
			return 0;
		/* Attaching to a thread that already exited (a zombie leader whose sub-threads
		 * live on) fails with EPERM as well: that is not a permission problem. */
		if (e == EPERM && ((st = thread_state(s->pid, tid)) == 0 || st == 'Z' || st == 'X'))
			return 0;
		return -e;
	}
	s->t[s->nt].tid = tid;
	s->t[s->nt].state = T_STOPPED;
	s->t[s->nt].sig = 0;
	s->nt++;
	/* An error here means the thread is dying; wait_stop() will tell. */
	ptrace(PTRACE_INTERRUPT, tid, 0, 0);
	return 1;
}

/* Waits until a freshly seized thread is in a ptrace stop. */
static int wait_attached(struct sess *s, struct thr *t)
{
	int st, r = wait_stop(t->tid, &st);

	if (r == -ECHILD) {
		/* It exited between SEIZE and the stop.  A non-leader is reaped now; a dead
		 * leader cannot be reaped while other threads live (see finish()). */
		t->state = T_DEAD;
		if (t->tid != s->pid) {
			reap(t->tid);
			t->state = T_GONE;
		}
		return 0;
	}
	if (r < 0)
		return r;
	/* PTRACE_EVENT_STOP (our interrupt, or a group-stop) or a signal-delivery stop if a
	 * signal was being dequeued: both are stops inside get_signal().  Remember the
	 * signal so that detaching delivers it. */
	t->sig = (st >> 8) == 0 && st > 0 && st < 128 ? st : 0;
	return 0;
}

/* Stops every thread: threads can be created until their creator is stopped, so list
 * /proc/PID/task again after each round until a listing shows nothing new. */
static int attach_all(struct sess *s)
{
	char path[64];

	snprintf(path, sizeof(path), "/proc/%d/task", s->pid);
	for (;;) {
		int first = s->nt, r = 0;
		DIR *d = opendir(path);
		struct dirent *de;

		if (!d)
			return errno == ENOENT ? -ESRCH : -errno;
		while ((de = readdir(d))) {
			char *end;
			long tid = strtol(de->d_name, &end, 10);
			if (*end || tid <= 0 || find_thr(s, (pid_t)tid))
				continue;
			r = seize_one(s, (pid_t)tid);
			if (r < 0)
				break;
		}
		closedir(d);
		for (int i = first; i < s->nt; i++) {
			int w = wait_attached(s, &s->t[i]);
			if (w < 0 && r >= 0)
				r = w;
		}
		if (r < 0)
			return r;
		if (s->nt == first)
			break;
	}
	for (int i = 0; i < s->nt; i++)
		if (s->t[i].state == T_STOPPED)
			return 0;
	return -ESRCH;
}

/* ---- finding a syscall instruction ---------------------------------------------------- */

/* Searches [start, end) of the target for 0f 05; returns its address or 0. */
static unsigned long scan_range(pid_t tid, unsigned long start, unsigned long end, unsigned char *buf,
				size_t bufsize)
{
	unsigned long a = start;

	while (a < end) {
		size_t len = end - a < bufsize ? end - a : bufsize;
		ssize_t r = read_mem(tid, a, buf, len);
		unsigned char *hit;
		if (r < 2)
			return 0;
		hit = memmem(buf, (size_t)r, "\x0f\x05", 2);
		if (hit)
			return a + (unsigned long)(hit - buf);
		a += (unsigned long)r - 1; /* keep one byte: the pair may straddle two chunks */
	}
	return 0;
}

/* Finds an existing syscall instruction.  Instruction boundaries do not matter: the thread
 * starts executing exactly there and stops right after the syscall.  The vDSO comes first:
 * it is always there, small, and never a userfaultfd-managed range. */
static unsigned long find_gadget(pid_t pid, pid_t tid)
{
	char path[64];
	char *maps = NULL, *line, *save = NULL;
	unsigned char *buf;
	size_t size = 0, len = 0;
	unsigned long found = 0;
	int fd, pass;

	snprintf(path, sizeof(path), "/proc/%d/task/%d/maps", pid, tid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	for (;;) {
		ssize_t r;
		if (size - len < 4096) {
			char *m = realloc(maps, size + 65536);
			if (!m)
				break;
			maps = m;
			size += 65536;
		}
		r = read(fd, maps + len, size - len - 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		len += (size_t)r;
	}
	close(fd);
	buf = malloc(65536);
	if (!maps || !buf)
		goto out;
	maps[len] = 0;

	for (pass = 0; pass < 2 && !found; pass++) {
		char *copy = strdup(maps);
		if (!copy)
			break;
		for (line = strtok_r(copy, "\n", &save); line && !found; line = strtok_r(NULL, "\n", &save)) {
			unsigned long start, end;
			char perms[8] = "";
			int off = 0;
			const char *name;
			if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %n", &start, &end, perms, &off) < 3)
				continue;
			name = off ? line + off : "";
			if (perms[2] != 'x' || perms[0] != 'r')
				continue;
			/* [vsyscall] reads as code but only its three entry points may be
			 * executed (the kernel emulates them); anything else faults. */
			if (!strcmp(name, "[vsyscall]"))
				continue;
			if ((pass == 0) != !strcmp(name, "[vdso]"))
				continue;
			found = scan_range(tid, start, end, buf, 65536);
		}
		free(copy);
	}
out:
	free(buf);
	free(maps);
	return found;
}

/* ---- rseq ------------------------------------------------------------------------------ */

struct uf_rseq_conf {
	uint64_t rseq_abi_pointer;
	uint32_t rseq_abi_size, signature, flags, pad;
};

struct uf_rseq_cs {
	uint32_t version, flags;
	uint64_t start_ip, post_commit_offset, abort_ip;
};

/* If the thread was stopped inside a restartable-sequence critical section, returns the
 * section's abort address, else 0.  The stop preempted the section, so the kernel would
 * abort it on the way back to user space; but our excursion to the gadget (outside the
 * section) makes the kernel clear rseq->rseq_cs instead, and returning to the old rip would
 * then commit a preempted section (per-CPU data corruption in e.g. tcmalloc).  So we take
 * the abort path ourselves, as the kernel would have. */
static unsigned long rseq_abort_ip(pid_t tid, const struct user_regs_struct *r)
{
	struct uf_rseq_conf conf;
	struct uf_rseq_cs cs;
	uint64_t cs_ptr;
	uint32_t sig;

	if ((long long)r->orig_rax != -1) /* in a syscall: never inside a critical section */
		return 0;
	memset(&conf, 0, sizeof(conf));
	if (ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, (void *)sizeof(conf), &conf) <= 0 ||
	    !conf.rseq_abi_pointer)
		return 0;
	/* struct rseq: u32 cpu_id_start, u32 cpu_id, u64 rseq_cs, ... */
	if (read_mem(tid, conf.rseq_abi_pointer + 8, &cs_ptr, 8) != 8 || !cs_ptr)
		return 0;
	if (read_mem(tid, cs_ptr, &cs, sizeof(cs)) != (ssize_t)sizeof(cs) || cs.version != 0)
		return 0;
	if (r->rip - cs.start_ip >= cs.post_commit_offset)
		return 0;
	/* The kernel kills a thread whose abort handler lacks the signature; leave that case
	 * to it rather than jumping to an unchecked address. */
	if (read_mem(tid, cs.abort_ip - 4, &sig, 4) != 4 || sig != conf.signature)
		return 0;
	return cs.abort_ip;
}

/* ---- running the injected calls -------------------------------------------------------- */

/* Remembers a signal that the injection thread dequeued while it ran for us: it is given
 * back before detaching.  Standard signals do not queue, so one of each is enough. */
static void collect_signal(struct sess *s, pid_t tid, int sig)
{
	siginfo_t si;

	memset(&si, 0, sizeof(si));
	if (ptrace(PTRACE_GETSIGINFO, tid, 0, &si) < 0) {
		si.si_signo = sig;
		si.si_code = SI_USER;
	}
	/* A seccomp filter or syscall user dispatch trapping OUR syscall: not the program's. */
	if (sig == SIGSYS && (unsigned long)si.si_call_addr == s->gadget + 2)
		return;
	if (sig < 32) /* below the kernel's first real-time signal */
		for (int i = 0; i < s->nsigs; i++)
			if (s->sigs[i].si_signo == sig)
				return;
	if (s->nsigs == s->capsigs) {
		int cap = s->capsigs ? s->capsigs * 2 : 8;
		siginfo_t *p = realloc(s->sigs, (size_t)cap * sizeof(*p));
		if (!p)
			return; /* out of memory: the signal is lost, the session goes on */
		s->sigs = p;
		s->capsigs = cap;
	}
	s->sigs[s->nsigs++] = si;
}

/* Resumes the injection thread with PTRACE_SYSCALL and waits for its next syscall stop.
 * Signal-delivery stops on the way are collected and suppressed (resume with 0);
 * PTRACE_EVENT_STOP (a pending interrupt, a group-stop) is simply resumed. */
static int step_to_syscall_stop(struct sess *s)
{
	pid_t tid = s->t[s->inj].tid;

	for (;;) {
		int st, r;
		if (ptrace(PTRACE_SYSCALL, tid, 0, 0) < 0)
			return errno == ESRCH ? -ESRCH : -errno;
		r = wait_stop(tid, &st);
		if (r == -ECHILD)
			return -ESRCH;
		if (r < 0)
			return r;
		if (st == UF_SYSCALL_STOP) {
			s->where = W_SYSCALL;
			return 0;
		}
		s->where = W_SIGNAL;
		if ((st >> 8) == 0 && st > 0 && st < 128)
			collect_signal(s, tid, st);
	}
}

/* Signals the kernel forces on a thread (faults, seccomp's SIGSYS): if they were blocked,
 * force_sig would reset the handler to the default action and kill the target. */
#define UF_SYNC_SIGNALS                                                                     \
	((1ULL << (SIGILL - 1)) | (1ULL << (SIGTRAP - 1)) | (1ULL << (SIGBUS - 1)) |        \
	 (1ULL << (SIGFPE - 1)) | (1ULL << (SIGSEGV - 1)) | (1ULL << (SIGSYS - 1)))

/* Blocks asynchronous signals in the injection thread for the rest of the session.  A
 * signal it dequeued would cost a ptrace stop, lose part of its siginfo when given back, and
 * - worse - signals given back are dequeued again by the next session if the target had no
 * time to handle them in between, so back-to-back sessions under a stream of queued signals
 * snowball.  Blocked, they simply stay pending (process-wide ones too: every other thread is
 * stopped) and are delivered natively once the mask is restored and we detach. */
static int block_signals(struct sess *s)
{
	pid_t tid = s->t[s->inj].tid;
	uint64_t block;

	if (ptrace(PTRACE_GETSIGMASK, tid, (void *)sizeof(s->mask), &s->mask) < 0)
		return errno == ESRCH ? -ESRCH : 0; /* old kernel: signals get collected instead */
	block = s->mask | ~UF_SYNC_SIGNALS;
	if (ptrace(PTRACE_SETSIGMASK, tid, (void *)sizeof(block), &block) < 0)
		return errno == ESRCH ? -ESRCH : 0;
	s->masked = 1;
	return 0;
}

/* Syscalls that run with a temporary signal mask and, when interrupted, leave the real mask
 * in saved_sigmask with TIF_RESTORE_SIGMASK set: rt_sigsuspend, pselect6, ppoll, epoll_pwait,
 * io_pgetevents, io_uring_enter, epoll_pwait2.  Since Linux 5.1 PTRACE_GET/SETSIGMASK take
 * that into account; before, they read the temporary mask and left the flag set, and putting
 * "our" mask back would lose the real one for good.  For these we block only after the first
 * return to user space (at the gadget), where the kernel has restored the real mask: correct
 * on every kernel, at the price of dequeuing the signals already pending then. */
static int in_sigmask_syscall(const struct user_regs_struct *r)
{
	long nr = (long)r->orig_rax & ~0x40000000L; /* x32 syscalls share these numbers */

	if ((long long)r->orig_rax < 0)
		return 0;
	return nr == 130 || nr == 270 || nr == 271 || nr == 281 || nr == 333 || nr == 426 || nr == 441;
}

static int run_call(struct sess *s, struct uf_syscall *c)
{
	pid_t tid = s->t[s->inj].tid;
	struct user_regs_struct regs = s->saved;
	int r;

	regs.rip = s->gadget;
	regs.rax = (unsigned long long)c->nr;
	regs.rdi = (unsigned long long)c->args[0];
	regs.rsi = (unsigned long long)c->args[1];
	regs.rdx = (unsigned long long)c->args[2];
	regs.r10 = (unsigned long long)c->args[3];
	regs.r8 = (unsigned long long)c->args[4];
	regs.r9 = (unsigned long long)c->args[5];
	/* orig_rax = -1 says "not in a syscall": when the thread leaves a stop inside
	 * get_signal(), the kernel's restart fixup (rax = orig_rax, rip -= 2 for -ERESTART*)
	 * must not rewrite the registers we just set. */
	regs.orig_rax = (unsigned long long)-1LL;
	if (ptrace(PTRACE_SETREGS, tid, 0, &regs) < 0)
		return errno == ESRCH ? -ESRCH : -errno;
	s->moved = 1;
	r = step_to_syscall_stop(s); /* entry */
	if (!r && !s->masked)
		r = block_signals(s);
	if (!r)
		r = step_to_syscall_stop(s); /* exit */
	if (r)
		return r;
	if (ptrace(PTRACE_GETREGS, tid, 0, &regs) < 0)
		return errno == ESRCH ? -ESRCH : -errno;
	c->ret = (long)regs.rax;
	return 0;
}

/* Was the thread stopped in a syscall that the kernel will restart (or turn into EINTR if a
 * handler runs) when it leaves get_signal()? */
static int restart_pending(const struct user_regs_struct *r)
{
	long ax = (long)r->rax;

	if ((long long)r->orig_rax < 0)
		return 0;
	return ax == -UF_ERESTARTSYS || ax == -UF_ERESTARTNOINTR || ax == -UF_ERESTARTNOHAND ||
	       ax == -UF_ERESTART_RESTARTBLOCK;
}

/* Moves the injection thread from its syscall-exit stop back into a stop inside
 * get_signal() (PTRACE_EVENT_STOP), without letting it run any user code: the pending
 * interrupt traps it on the way out of the syscall. */
static int park_in_get_signal(struct sess *s)
{
	pid_t tid = s->t[s->inj].tid;
	struct user_regs_struct regs = s->saved;

	regs.orig_rax = (unsigned long long)-1LL;
	regs.rip = s->gadget; /* only reached if the trap were somehow missed: a getpid() */
	regs.rax = SYS_getpid;
	if (ptrace(PTRACE_SETREGS, tid, 0, &regs) < 0 || ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0)
		return errno == ESRCH ? -ESRCH : -errno;
	for (;;) {
		int st, r;
		if (ptrace(PTRACE_SYSCALL, tid, 0, 0) < 0)
			return errno == ESRCH ? -ESRCH : -errno;
		r = wait_stop(tid, &st);
		if (r == -ECHILD)
			return -ESRCH;
		if (r < 0)
			return r;
		if (st == UF_SYSCALL_STOP) {
			s->where = W_SYSCALL;
			if (ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0)
				return -errno;
			continue;
		}
		s->where = W_SIGNAL;
		if ((st >> 8) == 0 && st > 0 && st < 128)
			collect_signal(s, tid, st);
		return 0;
	}
}

/* Puts the injection thread back as it was.
 *
 * Syscall restart: a thread stopped while blocked in a syscall was stopped inside
 * get_signal() with orig_rax = the syscall number and rax = -ERESTARTSYS (512),
 * -ERESTARTNOINTR (513), -ERESTARTNOHAND (514) or -ERESTART_RESTARTBLOCK (516).  On leaving
 * get_signal() the kernel turns these into "restart" (rax = orig_rax, or __NR_restart_syscall
 * for 516, and rip -= 2 back onto the syscall instruction) - or, if a signal handler runs,
 * into -EINTR or a restart depending on the code and SA_RESTART.  After our calls the thread
 * sits in a syscall-EXIT stop, which returns to user space without that fixup unless
 * something forces a pass through get_signal() (PTRACE_DETACH happens to, but that is an
 * undocumented detail of __ptrace_unlink), so -512 could reach the program.  Rewriting the
 * registers ourselves (rax = orig_rax, rip -= 2) is right only if no handler runs on the way
 * out: with a signal pending (one that arrived during the session) the handler would run and
 * then the syscall would restart where it must fail with EINTR - pause() never returns,
 * Python never sees Ctrl-C (the test "signal during session" shows exactly that).  So we
 * park the thread back inside get_signal() (PTRACE_INTERRUPT -> PTRACE_EVENT_STOP) and
 * restore the registers bit for bit there; the kernel then applies exactly the fixup it
 * would have applied had we never been there, handler and restart_block semantics included.
 *
 * Its signal mask is restored and the signals it dequeued during the session are queued
 * again (with their original siginfo where the kernel allows it) while it is still stopped,
 * so that they are delivered against the original registers when it leaves get_signal(). */
static int restore_injection_thread(struct sess *s)
{
	struct thr *t = &s->t[s->inj];
	struct user_regs_struct regs = s->saved;
	int r = 0;

	if (s->abort_ip && s->moved)
		regs.rip = s->abort_ip;
	if (s->where == W_SYSCALL && (restart_pending(&s->saved) || s->nsigs > 0)) {
		r = park_in_get_signal(s);
		if (r)
			return r;
	}
	if (ptrace(PTRACE_SETREGS, t->tid, 0, &regs) < 0)
		return errno == ESRCH ? -ESRCH : -errno;
	if (s->masked && ptrace(PTRACE_SETSIGMASK, t->tid, (void *)sizeof(s->mask), &s->mask) < 0)
		return errno == ESRCH ? -ESRCH : -errno;
	for (int i = 0; i < s->nsigs; i++) {
		siginfo_t si = s->sigs[i];
		/* rt_tgsigqueueinfo() keeps si_value etc. but refuses kernel/kill()-style
		 * si_codes for another process; tgkill() then still delivers the signal. */
		if (syscall(SYS_rt_tgsigqueueinfo, s->pid, t->tid, si.si_signo, &si) < 0)
			syscall(SYS_tgkill, s->pid, t->tid, si.si_signo);
	}
	return r;
}

/* ---- leaving ---------------------------------------------------------------------------- */

/* Restores and detaches everything; reaps what died.  Returns -ESRCH if the process died. */
static int finish(struct sess *s)
{
	int detached = 0;
	struct thr *leader = find_thr(s, s->pid);

	if (s->inj >= 0 && (s->moved || s->masked) && s->t[s->inj].state == T_STOPPED) {
		if (restore_injection_thread(s) == -ESRCH)
			s->died = 1;
		s->t[s->inj].sig = 0; /* its signals were re-queued above */
	}
	for (int i = 0; i < s->nt; i++) {
		struct thr *t = &s->t[i];
		if (t->state != T_STOPPED)
			continue;
		/* From a signal-delivery stop, data = signo delivers the signal with its
		 * original siginfo; from PTRACE_EVENT_STOP it is ignored (sig is 0 then). */
		if (ptrace(PTRACE_DETACH, t->tid, 0, (void *)(long)t->sig) == 0) {
			t->state = T_GONE;
			detached++;
		} else {
			/* Only SIGKILL wakes a thread out of a ptrace stop: it is dying. */
			t->state = T_DEAD;
			s->died = 1;
		}
	}
	for (int i = 0; i < s->nt; i++) {
		if (s->t[i].state == T_DEAD && s->t[i].tid != s->pid) {
			reap(s->t[i].tid);
			s->t[i].state = T_GONE;
		}
	}
	/* A dead leader is reported to us (its tracer) once all other threads are reaped;
	 * consuming that report hands it over to the real parent.  If we ARE the real parent,
	 * consuming it would reap the process and steal its exit status from the caller's own
	 * waitpid(), so it is left for that.  A leader that died alone while other threads
	 * live cannot be waited for now (see limitations). */
	if (leader && leader->state == T_DEAD && !s->real_parent && !detached)
		reap(leader->tid);
	return s->died ? -ESRCH : 0;
}

/* UF_CALL_RSEQ_AREAS: the rseq areas of the stopped threads, the injection thread's first. */
static long rseq_areas(struct sess *s, const struct uf_syscall *c)
{
	uint64_t *out = (uint64_t *)c->args[0];
	long cap = c->args[1], found = 0;

	if (cap < 0 || (cap > 0 && !out))
		return -EINVAL;
	for (int k = -1; k < s->nt; k++) {
		int i = k < 0 ? s->inj : k;
		struct uf_rseq_conf conf;
		long r;
		if (i < 0 || (k >= 0 && i == s->inj) || s->t[i].state != T_STOPPED)
			continue;
		memset(&conf, 0, sizeof(conf));
		r = ptrace(PTRACE_GET_RSEQ_CONFIGURATION, s->t[i].tid, (void *)sizeof(conf), &conf);
		if (r < 0) {
			if (errno == EIO || errno == EINVAL)
				return -EOPNOTSUPP;
			continue; /* ESRCH: it is dying */
		}
		if (!conf.rseq_abi_pointer)
			continue;
		if (found < cap) {
			out[2 * found] = conf.rseq_abi_pointer;
			out[2 * found + 1] = conf.rseq_abi_size ? conf.rseq_abi_size : 32;
		}
		found++;
	}
	return found;
}

/* UF_CALL_UNLESS_RSEQ: 1 if [args[0], args[0] + args[1]) shares a page with the injection
 * thread's rseq area. */
static long touches_rseq(struct sess *s, const struct uf_syscall *c)
{
	unsigned long start = (unsigned long)c->args[0], len = (unsigned long)c->args[1];
	unsigned long page = (unsigned long)sysconf(_SC_PAGESIZE);

	if (!s->rseq_known) {
		struct uf_rseq_conf conf;
		memset(&conf, 0, sizeof(conf));
		s->rseq_known = 1;
		if (ptrace(PTRACE_GET_RSEQ_CONFIGURATION, s->t[s->inj].tid, (void *)sizeof(conf), &conf) < 0) {
			if (errno == ESRCH)
				return -ESRCH;
			/* no way to know (Linux < 5.13): assume the worst for this range */
			s->rseq_start = 0;
			s->rseq_end = ~0UL;
		} else if (conf.rseq_abi_pointer) {
			unsigned long n = conf.rseq_abi_size ? conf.rseq_abi_size : 32;
			s->rseq_start = conf.rseq_abi_pointer & ~(page - 1);
			s->rseq_end = (conf.rseq_abi_pointer + n + page - 1) & ~(page - 1);
		}
	}
	return len > 0 && start < s->rseq_end && s->rseq_start < start + len;
}

/* Sets the injection thread up for running calls: its registers, a syscall instruction,
 * its rseq state, its signals.  Done before the first real call only, so that a session of
 * pseudo-calls never resumes it. */
static int prepare(struct sess *s)
{
	pid_t tid = s->t[s->inj].tid;

	s->prepared = 1;
	if (ptrace(PTRACE_GETREGS, tid, 0, &s->saved) < 0)
		return errno == ESRCH ? -ESRCH : -errno;
	if (s->saved.cs != UF_USER_CS) /* a 32-bit process: 0f 05 is not its syscall */
		return -ENOEXEC;
	s->gadget = find_gadget(s->pid, tid);
	if (!s->gadget) {
		/* An empty /proc/PID/maps: SIGKILL took it out of its stop, it is exiting. */
		siginfo_t si;
		if (ptrace(PTRACE_GETSIGINFO, tid, 0, &si) < 0 && errno == ESRCH)
			return -ESRCH;
		return -ENOEXEC;
	}
	/* Must be read before the first resume: returning to user space at the gadget makes
	 * the kernel clear rseq->rseq_cs. */
	s->abort_ip = rseq_abort_ip(tid, &s->saved);
	/* Once resumed, the thread leaves the signal-delivery stop it may be parked in; that
	 * signal joins the ones collected during the session and is given back at the end. */
	if (s->t[s->inj].sig) {
		collect_signal(s, tid, s->t[s->inj].sig);
		s->t[s->inj].sig = 0;
	}
	s->where = W_SIGNAL;
	if (!in_sigmask_syscall(&s->saved))
		return block_signals(s);
	return 0;
}

int uf_inject(int pid, struct uf_syscall *calls, int n)
{
	struct sess s;
	char path[64], buf[4096];
	int rc, rc2, i;
	long slack;

	if (pid <= 0 || n < 0 || (n > 0 && !calls))
		return -EINVAL;
	for (i = 0; i < n; i++)
		calls[i].ret = -ECANCELED;
	if (pid == getpid())
		return -EINVAL;
	snprintf(path, sizeof(path), "/proc/%d/status", pid);
	rc = (int)read_small(path, buf, sizeof(buf));
	if (rc < 0)
		return rc == -ENOENT ? -ESRCH : rc;
	/* /proc/TID/ exists for every thread; we want a process. */
	if (status_field(buf, "\nTgid:") != pid)
		return -EINVAL;

	memset(&s, 0, sizeof(s));
	s.pid = pid;
	s.inj = -1;
	s.real_parent = status_field(buf, "\nPPid:") == getpid();

	/* wait_stop() naps for microseconds: the default 50 us timer slack would dominate */
	slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
	if (slack > 1000)
		prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
	rc = attach_all(&s);
	if (rc)
		goto out;
	/* The leader if it lives, else any stopped thread. */
	for (i = 0; i < s.nt; i++)
		if (s.t[i].state == T_STOPPED && (s.inj < 0 || s.t[i].tid == pid))
			s.inj = i;
	for (i = 0; i < n && !rc; i++) {
		if (calls[i].nr == UF_CALL_RSEQ_AREAS) {
			calls[i].ret = rseq_areas(&s, &calls[i]);
			continue;
		}
		if (calls[i].nr == UF_CALL_IF_SAME_FILE) {
			long r = syscall(SYS_kcmp, pid, getpid(), KCMP_FILE, calls[i].args[0], calls[i].args[1]);
			calls[i].ret = r < 0 ? -errno : r != 0;
			if (calls[i].ret)
				break; /* the rest stays -ECANCELED */
			continue;
		}
		if (calls[i].nr == UF_CALL_UNLESS_RSEQ) {
			calls[i].ret = touches_rseq(&s, &calls[i]);
			if (calls[i].ret == 1 && i + 1 < n) {
				i++;
				calls[i].ret = -EDEADLK;
			}
			continue;
		}
		if (!s.prepared) {
			rc = prepare(&s);
			if (rc)
				break;
		}
		rc = run_call(&s, &calls[i]);
		if (rc == -ESRCH) {
			s.t[s.inj].state = T_DEAD;
			s.died = 1;
		}
	}
out:
	rc2 = finish(&s);
	if (slack > 1000)
		prctl(PR_SET_TIMERSLACK, (unsigned long)slack, 0, 0, 0);
	free(s.t);
	free(s.sigs);
	return rc ? rc : rc2;
}
#endif /* __x86_64__ */

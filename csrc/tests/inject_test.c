/*
 * inject_test.c - tests of uf_inject() (csrc/inject.c) against real child processes.
 *
 *   gcc -O2 -Wall -Wextra -pthread -o /tmp/inject_test csrc/tests/inject_test.c csrc/inject.c
 *   /tmp/inject_test            # one line per check, exit status 1 on any failure
 *
 * Every target is a forked child (PR_SET_PDEATHSIG kills it if we die) that reports what it
 * sees through a MAP_SHARED page and a command pipe.  A watchdog alarm turns a hang into a
 * failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>

struct uf_syscall {
	long nr;
	long args[6];
	long ret;
};
int uf_inject(int pid, struct uf_syscall *calls, int n);
#define UF_CALL_RSEQ_AREAS (-1000) /* inject.c pseudo-calls */
#define UF_CALL_UNLESS_RSEQ (-1001)
#define UF_CALL_IF_SAME_FILE (-1002)

/* ---- reporting ------------------------------------------------------------------ */

static int failures;

#define CHECK(cond, ...)                                                  \
	do {                                                              \
		int ok_ = !!(cond);                                       \
		printf("%s ", ok_ ? "ok  " : "FAIL");                     \
		printf(__VA_ARGS__);                                      \
		printf("\n");                                             \
		fflush(stdout);                                           \
		if (!ok_)                                                 \
			failures++;                                       \
	} while (0)

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* Polls `expr` every millisecond for up to `ms`; evaluates to its final truth. */
#define WAIT_FOR(expr, ms)                                                 \
	({                                                                 \
		uint64_t end_ = now_ns() + (uint64_t)(ms) * 1000000ULL;    \
		int ok_;                                                   \
		while (!(ok_ = !!(expr)) && now_ns() < end_)               \
			sleep_ms(1);                                       \
		ok_;                                                       \
	})

/* ---- state shared with the children ------------------------------------------------ */

struct shared {
	volatile int tids[8];
	volatile uint64_t busy_rounds, busy_bad;
	volatile uint64_t read_bytes, read_bad;
	volatile int64_t read_err;
	volatile uint64_t sleeps, sleep_bad;
	volatile uint64_t cond_wakes;
	volatile uint64_t cmd_bad;
	volatile uint64_t sig_count, rt_count, rt_sum;
	volatile uint64_t rseq_aborts, rseq_spins;
	volatile int rseq_ready;
	volatile uint64_t rseq_area[2]; /* the leader's and the spinner's struct rseq */
	volatile int blocked_ret, blocked_errno, blocked_done;
	volatile int ready;
	volatile int mask_ok;
	int futex_word;
};
static struct shared *sh;

static long sys_gettid(void)
{
	return syscall(SYS_gettid);
}

static int read_file(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = 0;
	return (int)n;
}

static long status_field(int pid, const char *key)
{
	char path[64], buf[4096], *p;

	snprintf(path, sizeof(path), "/proc/%d/status", pid);
	if (read_file(path, buf, sizeof(buf)) < 0 || !(p = strstr(buf, key)))
		return -1;
	return strtol(p + strlen(key), NULL, 10);
}

static char task_state(int pid, int tid)
{
	char path[64], buf[512], *p;

	snprintf(path, sizeof(path), "/proc/%d/task/%d/stat", pid, tid);
	if (read_file(path, buf, sizeof(buf)) < 0 || !(p = strrchr(buf, ')')))
		return 0;
	return p[2];
}

/* /proc/PID/task/TID/syscall: "nr args... sp pc" of a blocked thread. */
static void task_syscall(int pid, int tid, char *buf, size_t size)
{
	char path[64];

	snprintf(path, sizeof(path), "/proc/%d/task/%d/syscall", pid, tid);
	if (read_file(path, buf, size) < 0)
		snprintf(buf, size, "?");
}

/* ---- children ---------------------------------------------------------------------- */

struct child {
	pid_t pid;
	int cmd, rep; /* pipes: commands to the child, replies from it */
	int data;     /* write end of the pipe the child's reader thread reads */
};

enum { OP_PING = 1, OP_CHECK, OP_FILL, OP_COND, OP_EXIT };

struct cmd {
	int op;
	int arg;
	uint64_t addr, len;
};

static int child_cmd_fd, child_rep_fd, child_data_fd;

static int read_full(int fd, void *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t r = read(fd, (char *)buf + got, len - got);
		if (r < 0 && errno == EINTR) {
			sh->cmd_bad++; /* SA_RESTART handlers only: EINTR means a broken restart */
			continue;
		}
		if (r <= 0)
			return -1;
		got += (size_t)r;
	}
	return 0;
}

static pthread_mutex_t cond_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond_cv = PTHREAD_COND_INITIALIZER;
static uint64_t cond_gen;

/* The child's main thread: answers commands until told to exit. */
static void serve(void)
{
	struct cmd c;

	for (;;) {
		int64_t r = 0;
		if (read_full(child_cmd_fd, &c, sizeof(c)) < 0)
			_exit(0);
		switch (c.op) {
		case OP_PING:
			r = 1;
			break;
		case OP_CHECK: { /* are all bytes of [addr, addr+len) equal to arg? */
			const volatile unsigned char *p = (const unsigned char *)(uintptr_t)c.addr;
			r = 1;
			for (uint64_t i = 0; i < c.len; i++)
				if (p[i] != (unsigned char)c.arg)
					r = 0;
			break;
		}
		case OP_FILL: { /* a fresh page filled with arg */
			void *p = mmap(NULL, c.len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (p == MAP_FAILED) {
				r = 0;
				break;
			}
			memset(p, c.arg, c.len);
			r = (int64_t)(uintptr_t)p;
			break;
		}
		case OP_COND:
			pthread_mutex_lock(&cond_mu);
			cond_gen++;
			pthread_cond_signal(&cond_cv);
			pthread_mutex_unlock(&cond_mu);
			r = 1;
			break;
		case OP_EXIT:
			_exit(c.arg);
		}
		if (write(child_rep_fd, &r, sizeof(r)) != sizeof(r))
			_exit(1);
	}
}

static struct child spawn(void (*body)(void))
{
	struct child ch = { -1, -1, -1, -1 };
	int c[2], r[2], d[2];

	if (pipe2(c, O_CLOEXEC) || pipe2(r, O_CLOEXEC) || pipe2(d, O_CLOEXEC)) {
		perror("pipe");
		exit(2);
	}
	memset((void *)sh, 0, sizeof(*sh));
	fflush(stdout);
	ch.pid = fork();
	if (ch.pid < 0) {
		perror("fork");
		exit(2);
	}
	if (ch.pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		close(c[1]);
		close(r[0]);
		close(d[1]);
		child_cmd_fd = c[0];
		child_rep_fd = r[1];
		child_data_fd = d[0];
		body();
		serve();
		_exit(0);
	}
	close(c[0]);
	close(r[1]);
	close(d[0]);
	ch.cmd = c[1];
	ch.rep = r[0];
	ch.data = d[1];
	return ch;
}

/* Sends a command and waits (at most 5 s) for the reply; -999 on timeout/EOF. */
static int64_t call(struct child *ch, int op, int arg, uint64_t addr, uint64_t len)
{
	struct cmd c = { op, arg, addr, len };
	struct pollfd pfd = { ch->rep, POLLIN, 0 };
	int64_t r;

	if (write(ch->cmd, &c, sizeof(c)) != sizeof(c))
		return -999;
	if (poll(&pfd, 1, 5000) != 1 || read(ch->rep, &r, sizeof(r)) != sizeof(r))
		return -999;
	return r;
}

/* Ends a child and returns its wait status. */
static int finish_child(struct child *ch)
{
	int st = -1;

	if (ch->pid > 0) {
		kill(ch->pid, SIGKILL);
		while (waitpid(ch->pid, &st, 0) < 0 && errno == EINTR)
			;
	}
	close(ch->cmd);
	close(ch->rep);
	close(ch->data);
	ch->pid = -1;
	return st;
}

static void nop_body(void)
{
}

static void start_thread(void *(*fn)(void *), void *arg)
{
	pthread_t t;
	pthread_attr_t a;

	pthread_attr_init(&a);
	pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &a, fn, arg)) {
		perror("pthread_create");
		_exit(3);
	}
	pthread_attr_destroy(&a);
}

/* A checksum whose result must not change: catches clobbered registers (integer and SSE). */
static uint64_t busy_sum(void)
{
	uint64_t x = 88172645463325252ULL;
	double d = 1.0;

	for (uint64_t i = 0; i < 2000000; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		d = d * 1.0000001 + (double)(x & 0xff) * 1e-9;
	}
	return x ^ (uint64_t)(d * 1e6);
}

static void *busy_thread(void *arg)
{
	uint64_t want = busy_sum();

	(void)arg;
	sh->tids[1] = (int)sys_gettid();
	for (;;) {
		if (busy_sum() != want)
			sh->busy_bad++;
		sh->busy_rounds++;
	}
	return NULL;
}

static void *reader_thread(void *arg)
{
	unsigned char b, expect = 0;

	(void)arg;
	sh->tids[2] = (int)sys_gettid();
	for (;;) {
		ssize_t r = read(child_data_fd, &b, 1);
		if (r == 1) {
			if (b != expect)
				sh->read_bad++;
			expect++;
			sh->read_bytes++;
		} else {
			sh->read_bad++;
			sh->read_err = r < 0 ? errno : 0;
			if (r == 0)
				return NULL;
		}
	}
	return NULL;
}

static void *sleeper_thread(void *arg)
{
	sigset_t all;

	/* A handler makes nanosleep() fail with EINTR even with SA_RESTART: keep signals away
	 * so that any EINTR or early wake-up here is the injector's fault. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	(void)arg;
	sh->tids[3] = (int)sys_gettid();
	for (;;) {
		struct timespec ts = { 0, 20 * 1000000L };
		uint64_t t0 = now_ns();
		int r = nanosleep(&ts, NULL);
		if (r != 0 || now_ns() - t0 < 20 * 1000000ULL)
			sh->sleep_bad++;
		sh->sleeps++;
	}
	return NULL;
}

static void *cond_thread(void *arg)
{
	uint64_t seen = 0;

	(void)arg;
	sh->tids[4] = (int)sys_gettid();
	pthread_mutex_lock(&cond_mu);
	for (;;) {
		while (cond_gen == seen)
			pthread_cond_wait(&cond_cv, &cond_mu);
		seen = cond_gen;
		sh->cond_wakes++;
	}
	return NULL;
}

/* Main thread blocked in read() on the command pipe, plus four threads: busy loop, read(),
 * nanosleep(), pthread_cond_wait(). */
static void mt_body(void)
{
	sh->tids[0] = (int)sys_gettid();
	start_thread(busy_thread, NULL);
	start_thread(reader_thread, NULL);
	start_thread(sleeper_thread, NULL);
	start_thread(cond_thread, NULL);
	while (!sh->tids[1] || !sh->tids[2] || !sh->tids[3] || !sh->tids[4])
		sleep_ms(1);
	sh->ready = 1;
}

static void sig_handler(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	/* atomics: handlers run concurrently in several threads */
	if (sig == SIGUSR1) {
		__atomic_fetch_add(&sh->sig_count, 1, __ATOMIC_RELAXED);
	} else if (sig == SIGUSR2) {
		/* only interrupts */
	} else {
		__atomic_fetch_add(&sh->rt_sum, (uint64_t)si->si_value.sival_int, __ATOMIC_RELAXED);
		__atomic_fetch_add(&sh->rt_count, 1, __ATOMIC_RELAXED);
	}
}

static void install(int sig, int flags)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = sig_handler;
	sa.sa_flags = SA_SIGINFO | flags;
	sigaction(sig, &sa, NULL);
}

static void sig_body(void)
{
	install(SIGUSR1, SA_RESTART);
	install(SIGRTMIN + 1, SA_RESTART);
	mt_body();
}

/* The leader waits in ppoll() with a temporary mask: the injector cannot block signals
 * before the thread first leaves that syscall, so pending ones are dequeued and given back. */
static void *ppoll_serve_thread(void *arg)
{
	(void)arg;
	serve();
	return NULL;
}

static void sig_ppoll_body(void)
{
	sigset_t tmp;

	install(SIGUSR1, SA_RESTART);
	install(SIGRTMIN + 1, SA_RESTART);
	start_thread(busy_thread, NULL);
	start_thread(ppoll_serve_thread, NULL);
	sh->ready = 1;
	sigemptyset(&tmp);
	for (;;) {
		struct pollfd p = { -1, 0, 0 };
		ppoll(&p, 1, NULL, &tmp);
	}
}

/* ---- helpers for the checks -------------------------------------------------------------- */

static struct uf_syscall sc(long nr, long a0, long a1, long a2, long a3, long a4, long a5)
{
	struct uf_syscall c = { nr, { a0, a1, a2, a3, a4, a5 }, 0 };
	return c;
}

static long inject1(int pid, long nr, long a0, long a1, long a2, long a3, long a4, long a5, int *rc)
{
	struct uf_syscall c = sc(nr, a0, a1, a2, a3, a4, a5);
	*rc = uf_inject(pid, &c, 1);
	return c.ret;
}

static int not_traced(int pid)
{
	return status_field(pid, "\nTracerPid:") == 0;
}

/* Sum of the bytes of the target's vDSO and libc text: the injector must never write code. */
static uint64_t code_digest(int pid)
{
	char path[64], line[512];
	uint64_t h = 1469598103934665603ULL;
	FILE *f;
	static unsigned char buf[1 << 16];

	snprintf(path, sizeof(path), "/proc/%d/maps", pid);
	f = fopen(path, "re");
	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f)) {
		unsigned long s, e;
		char perms[8];
		if (sscanf(line, "%lx-%lx %7s", &s, &e, perms) != 3 || perms[2] != 'x')
			continue;
		if (!strstr(line, "[vdso]") && !strstr(line, "libc"))
			continue;
		for (unsigned long a = s; a < e; a += sizeof(buf)) {
			size_t len = e - a < sizeof(buf) ? e - a : sizeof(buf);
			struct iovec l = { buf, len }, r = { (void *)a, len };
			if (process_vm_readv(pid, &l, 1, &r, 1, 0) != (ssize_t)len)
				return 0;
			for (size_t i = 0; i < len; i++)
				h = (h ^ buf[i]) * 1099511628211ULL;
		}
	}
	fclose(f);
	return h;
}

/* ---- the checks ------------------------------------------------------------------------- */

static void test_basic(void)
{
	struct child ch = spawn(nop_body);
	struct uf_syscall c[4];
	uint64_t before;
	int rc;
	long r;

	CHECK(call(&ch, OP_PING, 0, 0, 0) == 1, "basic: child answers");
	before = code_digest(ch.pid);
	r = inject1(ch.pid, SYS_getpid, 0, 0, 0, 0, 0, 0, &rc);
	CHECK(rc == 0 && r == ch.pid, "basic: getpid() injected returns the child's pid (rc=%d ret=%ld pid=%d)", rc,
	      r, ch.pid);
	r = inject1(ch.pid, SYS_close, -1, 0, 0, 0, 0, 0, &rc);
	CHECK(rc == 0 && r == -EBADF, "basic: close(-1) returns -EBADF (rc=%d ret=%ld)", rc, r);
	c[0] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
	c[1] = sc(SYS_close, -1, 0, 0, 0, 0, 0);
	c[2] = sc(SYS_getppid, 0, 0, 0, 0, 0, 0);
	c[3] = sc(SYS_gettid, 0, 0, 0, 0, 0, 0);
	rc = uf_inject(ch.pid, c, 4);
	CHECK(rc == 0 && c[0].ret == ch.pid && c[1].ret == -EBADF && c[2].ret == getpid() && c[3].ret == ch.pid,
	      "basic: 4 calls in one session (rc=%d: %ld %ld %ld %ld)", rc, c[0].ret, c[1].ret, c[2].ret, c[3].ret);
	rc = uf_inject(ch.pid, c, 0);
	CHECK(rc == 0, "basic: a session with 0 calls (rc=%d)", rc);
	CHECK(call(&ch, OP_PING, 0, 0, 0) == 1 && sh->cmd_bad == 0, "basic: child still answers, no EINTR seen");
	CHECK(not_traced(ch.pid), "basic: TracerPid is 0 after detaching");
	CHECK(before && code_digest(ch.pid) == before, "basic: vDSO and libc text unchanged");
	finish_child(&ch);
}

static void test_memory(void)
{
	struct child ch = spawn(nop_body);
	char path[64], link[128] = "";
	unsigned char page[4096];
	long addr, r;
	int rc;

	addr = inject1(ch.pid, SYS_mmap, 0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, &rc);
	CHECK(rc == 0 && addr > 0 && (addr & 4095) == 0, "mem: injected mmap returns a page address (rc=%d %#lx)", rc,
	      addr);
	if (rc == 0 && addr > 0) {
		struct iovec l = { page, sizeof(page) }, rv = { (void *)addr, sizeof(page) };
		memset(page, 0x5a, sizeof(page));
		CHECK(process_vm_writev(ch.pid, &l, 1, &rv, 1, 0) == sizeof(page), "mem: process_vm_writev into it");
		CHECK(call(&ch, OP_CHECK, 0x5a, (uint64_t)addr, 4096) == 1, "mem: the child reads what we wrote");
	}

	addr = (long)call(&ch, OP_FILL, 0xab, 0, 4096);
	CHECK(addr > 0 && call(&ch, OP_CHECK, 0xab, (uint64_t)addr, 4096) == 1, "mem: child filled a page with 0xab");
	r = inject1(ch.pid, SYS_madvise, addr, 4096, MADV_DONTNEED, 0, 0, 0, &rc);
	CHECK(rc == 0 && r == 0, "mem: injected madvise(MADV_DONTNEED) returns 0 (rc=%d ret=%ld)", rc, r);
	CHECK(call(&ch, OP_CHECK, 0, (uint64_t)addr, 4096) == 1, "mem: the child now reads zeros");

	r = inject1(ch.pid, 323 /* userfaultfd */, O_CLOEXEC | O_NONBLOCK, 0, 0, 0, 0, 0, &rc);
	snprintf(path, sizeof(path), "/proc/%d/fd/%ld", ch.pid, r);
	if (r >= 0 && readlink(path, link, sizeof(link) - 1) < 0)
		link[0] = 0;
	CHECK(rc == 0 && r >= 0 && strstr(link, "userfaultfd"), "mem: injected userfaultfd() gives fd %ld -> '%s'", r,
	      link);
	CHECK(call(&ch, OP_PING, 0, 0, 0) == 1 && not_traced(ch.pid), "mem: child healthy, not traced");
	finish_child(&ch);
}

/* 200 sessions against a child with threads in read(), nanosleep(), a futex and a busy loop. */
static void test_threads(void)
{
	struct child ch = spawn(mt_body);
	char sys_before[5][256], sys_after[5][256];
	uint64_t rounds, sleeps, wakes, bytes, digest;
	int bad = 0, rc = 0, same = 1;
	long r = 0;

	CHECK(WAIT_FOR(sh->ready, 5000), "threads: child with 5 threads ready");
	sleep_ms(30); /* let the blocked ones block */
	for (int i = 0; i < 5; i++)
		if (i != 1)
			task_syscall(ch.pid, sh->tids[i], sys_before[i], sizeof(sys_before[i]));
	digest = code_digest(ch.pid);
	rounds = sh->busy_rounds;
	for (int i = 0; i < 200; i++) {
		r = inject1(ch.pid, SYS_getpid, 0, 0, 0, 0, 0, 0, &rc);
		if (rc != 0 || r != ch.pid)
			bad++;
	}
	CHECK(bad == 0, "threads: 200 sessions of getpid() all returned the pid (last rc=%d ret=%ld)", rc, r);
	CHECK(not_traced(ch.pid), "threads: TracerPid is 0");
	for (int i = 0; i < 5; i++) {
		if (i == 1)
			continue;
		/* just resumed: give it a moment to re-enter its syscall */
		WAIT_FOR((task_syscall(ch.pid, sh->tids[i], sys_after[i], sizeof(sys_after[i])),
			  strncmp(sys_after[i], "running", 7)),
			 1000);
		if (strcmp(sys_before[i], sys_after[i]) && i != 3) { /* nanosleep loops meanwhile */
			printf("     thread %d: before '%s' after '%s'\n", i, sys_before[i], sys_after[i]);
			same = 0;
		}
	}
	CHECK(same, "threads: blocked threads sit in the same syscall, same args/sp/pc (leader: %.60s)",
	      sys_after[0]);

	/* read() thread: gets data written now, never saw EINTR or -512 */
	bytes = sh->read_bytes;
	for (unsigned char b = 0; b < 10; b++)
		if (write(ch.data, &b, 1) != 1)
			break;
	CHECK(WAIT_FOR(sh->read_bytes == bytes + 10, 2000) && sh->read_bad == 0,
	      "threads: read() thread received 10 bytes in order, no error (bad=%llu err=%lld)",
	      (unsigned long long)sh->read_bad, (long long)sh->read_err);
	sleeps = sh->sleeps;
	CHECK(WAIT_FOR(sh->sleeps > sleeps + 2, 2000) && sh->sleep_bad == 0,
	      "threads: nanosleep() completes, never early or EINTR (sleeps=%llu bad=%llu)",
	      (unsigned long long)sh->sleeps, (unsigned long long)sh->sleep_bad);
	wakes = sh->cond_wakes;
	CHECK(call(&ch, OP_COND, 0, 0, 0) == 1 && WAIT_FOR(sh->cond_wakes == wakes + 1, 2000),
	      "threads: pthread_cond_wait() thread wakes on signal");
	CHECK(WAIT_FOR(sh->busy_rounds > rounds + 2, 5000) && sh->busy_bad == 0,
	      "threads: busy checksum right (%llu rounds, %llu bad)", (unsigned long long)sh->busy_rounds,
	      (unsigned long long)sh->busy_bad);
	CHECK(call(&ch, OP_PING, 0, 0, 0) == 1 && sh->cmd_bad == 0, "threads: main thread answers, no EINTR seen");
	CHECK(digest && code_digest(ch.pid) == digest, "threads: vDSO and libc text unchanged");
	finish_child(&ch);
}

/* The injection thread (the leader) blocked in each kind of restartable syscall. */
enum { B_READ, B_NANOSLEEP, B_FUTEX, B_POLL, B_PAUSE, B_PPOLL, B_COUNT };
static const char *const bnames[] = { "read", "nanosleep", "futex", "poll", "pause", "ppoll" };
static int bkind;

static void blocked_body(void)
{
	uint64_t t0 = now_ns();
	int r = 0;

	install(SIGUSR2, 0); /* no SA_RESTART: a handler must make the call fail with EINTR */
	sh->ready = 1;
	switch (bkind) {
	case B_READ: {
		char b;
		r = (int)read(child_cmd_fd, &b, 1);
		break;
	}
	case B_NANOSLEEP: {
		struct timespec ts = { 0, 300 * 1000000L };
		r = nanosleep(&ts, NULL);
		if (r == 0 && now_ns() - t0 < 300 * 1000000ULL)
			r = -2; /* woke early */
		break;
	}
	case B_FUTEX: /* on the shared page, so that the test process can wake it */
		r = (int)syscall(SYS_futex, &sh->futex_word, FUTEX_WAIT, 0, NULL, NULL, 0);
		break;
	case B_POLL: {
		struct pollfd p = { child_cmd_fd, POLLIN, 0 };
		r = poll(&p, 1, 300);
		if (r == 0 && now_ns() - t0 < 300 * 1000000ULL)
			r = -2;
		break;
	}
	case B_PAUSE:
		r = pause();
		break;
	case B_PPOLL: { /* SIGUSR2 blocked except while in ppoll(): the kernel's saved-mask dance */
		sigset_t blk, tmp;
		struct pollfd p = { child_cmd_fd, POLLIN, 0 };
		sigemptyset(&blk);
		sigaddset(&blk, SIGUSR2);
		sigprocmask(SIG_BLOCK, &blk, NULL);
		sigemptyset(&tmp);
		r = ppoll(&p, 1, NULL, &tmp);
		sigprocmask(SIG_BLOCK, NULL, &blk);
		sh->mask_ok = sigismember(&blk, SIGUSR2) == 1;
		break;
	}
	}
	sh->blocked_ret = r;
	sh->blocked_errno = r < 0 ? errno : 0;
	sh->blocked_done = 1;
	for (;;)
		pause();
}

static void test_blocked_leader(void)
{
	for (bkind = 0; bkind < B_COUNT; bkind++) {
		struct child ch = spawn(blocked_body);
		int bad = 0, rc = 0, ok;
		long r = 0;

		WAIT_FOR(sh->ready, 2000);
		sleep_ms(20);
		for (int i = 0; i < 50 && !sh->blocked_done; i++) {
			r = inject1(ch.pid, SYS_getpid, 0, 0, 0, 0, 0, 0, &rc);
			if (rc != 0 || r != ch.pid)
				bad++;
		}
		CHECK(bad == 0 && !sh->blocked_done, "leader in %s: 50 sessions OK, call still blocked", bnames[bkind]);
		/* now end the blocked call the normal way */
		switch (bkind) {
		case B_READ:
			ok = write(ch.cmd, "x", 1) == 1;
			WAIT_FOR(sh->blocked_done, 2000);
			ok = ok && sh->blocked_done && sh->blocked_ret == 1;
			break;
		case B_NANOSLEEP:
		case B_POLL:
			WAIT_FOR(sh->blocked_done, 2000);
			ok = sh->blocked_done && sh->blocked_ret == 0;
			break;
		case B_FUTEX:
			sleep_ms(20);
			__atomic_store_n(&sh->futex_word, 1, __ATOMIC_SEQ_CST);
			syscall(SYS_futex, &sh->futex_word, FUTEX_WAKE, 1, NULL, NULL, 0);
			WAIT_FOR(sh->blocked_done, 2000);
			ok = sh->blocked_done && sh->blocked_ret == 0;
			break;
		case B_PAUSE:
		case B_PPOLL:
		default:
			kill(ch.pid, SIGUSR2);
			WAIT_FOR(sh->blocked_done, 2000);
			ok = sh->blocked_done && sh->blocked_ret == -1 && sh->blocked_errno == EINTR &&
			     (bkind != B_PPOLL || sh->mask_ok);
			break;
		}
		CHECK(ok, "leader in %s: completes as if never stopped (done=%d ret=%d errno=%d%s)", bnames[bkind],
		      sh->blocked_done, sh->blocked_ret, sh->blocked_errno,
		      bkind == B_PPOLL ? (sh->mask_ok ? ", mask kept" : ", MASK LOST") : "");
		CHECK(not_traced(ch.pid), "leader in %s: TracerPid is 0", bnames[bkind]);
		finish_child(&ch);
	}
}

/* A signal with a handler that arrives DURING a session while the injection thread was
 * blocked: the interrupted syscall must fail with EINTR as it would without us, not restart. */
struct kill_later {
	pid_t pid;
	int sig, delay_us;
};

static void *kill_later_thread(void *arg)
{
	struct kill_later *k = arg;
	usleep((useconds_t)k->delay_us);
	kill(k->pid, k->sig);
	return NULL;
}

static void test_signal_eintr(void)
{
	int eintr = 0, rounds = 12;
	static const int kinds[3] = { B_PAUSE, B_READ, B_PPOLL };

	for (int i = 0; i < rounds; i++) {
		struct child ch;
		struct kill_later k;
		pthread_t t;
		struct uf_syscall *c = calloc(3000, sizeof(*c));
		int rc;

		bkind = kinds[i % 3];
		ch = spawn(blocked_body);
		WAIT_FOR(sh->ready, 2000);
		sleep_ms(10);
		for (int j = 0; j < 3000; j++)
			c[j] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
		k.pid = ch.pid;
		k.sig = SIGUSR2;
		k.delay_us = 1000 + 500 * i;
		pthread_create(&t, NULL, kill_later_thread, &k);
		rc = uf_inject(ch.pid, c, 3000);
		pthread_join(t, NULL);
		if (rc == 0 && WAIT_FOR(sh->blocked_done, 2000) && sh->blocked_ret == -1 && sh->blocked_errno == EINTR &&
		    (bkind != B_PPOLL || sh->mask_ok))
			eintr++;
		else
			printf("     round %d (%s): rc=%d done=%d ret=%d errno=%d\n", i, bnames[bkind], rc,
			       sh->blocked_done, sh->blocked_ret, sh->blocked_errno);
		free(c);
		finish_child(&ch);
	}
	CHECK(eintr == rounds, "signal during session: blocked read()/pause()/ppoll() got EINTR in %d/%d rounds", eintr,
	      rounds);
}

/* Signals sent from another thread while we inject repeatedly. */
struct sender {
	pid_t pid;
	volatile int stop;
	int sent_usr1, sent_rt;
	uint64_t rt_sum;
};

static void *sender_thread(void *arg)
{
	struct sender *s = arg;

	while (!s->stop) {
		if (kill(s->pid, SIGUSR1) == 0)
			s->sent_usr1++;
		union sigval v = { .sival_int = s->sent_rt + 1 };
		if (sigqueue(s->pid, SIGRTMIN + 1, v) == 0) {
			s->sent_rt++;
			s->rt_sum += (uint64_t)v.sival_int;
		}
		usleep(200);
	}
	return NULL;
}

static void test_signals(int ppoll_leader)
{
	struct child ch = spawn(ppoll_leader ? sig_ppoll_body : sig_body);
	const char *what = ppoll_leader ? "signals (leader in ppoll)" : "signals";
	struct sender s = { 0, 0, 0, 0, 0 };
	struct uf_syscall c[20];
	pthread_t t;
	int bad = 0, rc = 0;
	uint64_t rounds;

	CHECK(WAIT_FOR(sh->ready, 5000), "%s: child ready", what);
	s.pid = ch.pid;
	pthread_create(&t, NULL, sender_thread, &s);
	for (int i = 0; i < 200; i++) {
		for (int j = 0; j < 20; j++)
			c[j] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
		rc = uf_inject(ch.pid, c, 20);
		for (int j = 0; j < 20; j++)
			if (c[j].ret != ch.pid)
				bad++;
		if (rc)
			bad++;
	}
	s.stop = 1;
	pthread_join(t, NULL);
	CHECK(bad == 0, "%s: 200 sessions x 20 calls while signals fly (last rc=%d)", what, rc);
	CHECK(WAIT_FOR(sh->sig_count >= 1, 2000), "%s: SIGUSR1 handler ran %llu times (%d sent)", what,
	      (unsigned long long)sh->sig_count, s.sent_usr1);
	CHECK(WAIT_FOR(sh->rt_count == (uint64_t)s.sent_rt, 2000) && sh->rt_sum == s.rt_sum,
	      "%s: all %d queued real-time signals arrived with their values (got %llu, sum %llu/%llu)", what, s.sent_rt,
	      (unsigned long long)sh->rt_count, (unsigned long long)sh->rt_sum, (unsigned long long)s.rt_sum);
	rounds = sh->busy_rounds;
	CHECK(call(&ch, OP_PING, 0, 0, 0) == 1 && sh->cmd_bad == 0 && WAIT_FOR(sh->busy_rounds > rounds, 3000) &&
		      sh->busy_bad == 0 && sh->read_bad == 0 && sh->sleep_bad == 0,
	      "%s: child healthy (cmd EINTR %llu, busy bad %llu, read bad %llu, sleep bad %llu)", what,
	      (unsigned long long)sh->cmd_bad, (unsigned long long)sh->busy_bad, (unsigned long long)sh->read_bad,
	      (unsigned long long)sh->sleep_bad);
	CHECK(not_traced(ch.pid), "%s: TracerPid is 0", what);
	finish_child(&ch);
}

/* A stopped (SIGSTOP) process stays stopped. */
static void test_stopped(void)
{
	struct child ch = spawn(mt_body);
	int rc;
	long r;

	WAIT_FOR(sh->ready, 5000);
	kill(ch.pid, SIGSTOP);
	CHECK(WAIT_FOR(task_state(ch.pid, ch.pid) == 'T', 2000), "stopped: child is group-stopped");
	r = inject1(ch.pid, SYS_getpid, 0, 0, 0, 0, 0, 0, &rc);
	CHECK(rc == 0 && r == ch.pid, "stopped: inject into a stopped process works (rc=%d ret=%ld)", rc, r);
	sleep_ms(20);
	CHECK(task_state(ch.pid, ch.pid) == 'T' && task_state(ch.pid, sh->tids[1]) == 'T',
	      "stopped: still stopped afterwards (leader %c, busy thread %c)", task_state(ch.pid, ch.pid),
	      task_state(ch.pid, sh->tids[1]));
	kill(ch.pid, SIGCONT);
	CHECK(call(&ch, OP_PING, 0, 0, 0) == 1 && not_traced(ch.pid) && sh->busy_bad == 0,
	      "stopped: runs again after SIGCONT");
	finish_child(&ch);
}

/* SIGSTOP cannot be blocked: arriving during a session it is dequeued by the injection
 * thread and must be given back, so that the process still stops. */
static void test_sigstop(void)
{
	int good = 0, rounds = 5;

	for (int i = 0; i < rounds; i++) {
		struct child ch = spawn(mt_body);
		struct uf_syscall *c = calloc(3000, sizeof(*c));
		struct kill_later k = { ch.pid, SIGSTOP, 1000 + 700 * i };
		pthread_t t;
		int rc, stopped;

		WAIT_FOR(sh->ready, 5000);
		for (int j = 0; j < 3000; j++)
			c[j] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
		pthread_create(&t, NULL, kill_later_thread, &k);
		rc = uf_inject(ch.pid, c, 3000);
		pthread_join(t, NULL);
		stopped = WAIT_FOR(task_state(ch.pid, ch.pid) == 'T' && task_state(ch.pid, sh->tids[1]) == 'T', 2000);
		kill(ch.pid, SIGCONT);
		if (rc == 0 && stopped && call(&ch, OP_PING, 0, 0, 0) == 1 && not_traced(ch.pid))
			good++;
		else
			printf("     round %d: rc=%d stopped=%d\n", i, rc, stopped);
		free(c);
		finish_child(&ch);
	}
	CHECK(good == rounds, "SIGSTOP during a session: the process stops, then continues on SIGCONT (%d/%d)", good,
	      rounds);
}

/* The leader called pthread_exit(): the session runs in another thread. */
static void *zl_thread(void *arg)
{
	(void)arg;
	sh->tids[1] = (int)sys_gettid();
	serve();
	return NULL;
}

static void zombie_leader_body(void)
{
	start_thread(zl_thread, NULL);
	start_thread(busy_thread, NULL);
	pthread_exit(NULL);
}

static void test_zombie_leader(void)
{
	struct child ch = spawn(zombie_leader_body);
	struct uf_syscall c[2] = { sc(SYS_getpid, 0, 0, 0, 0, 0, 0), sc(SYS_gettid, 0, 0, 0, 0, 0, 0) };
	int rc;

	CHECK(WAIT_FOR(task_state(ch.pid, ch.pid) == 'Z' && sh->tids[1], 2000), "zombie leader: leader exited");
	rc = uf_inject(ch.pid, c, 2);
	CHECK(rc == 0 && c[0].ret == ch.pid && c[1].ret != ch.pid && c[1].ret > 0,
	      "zombie leader: runs in another thread (rc=%d pid=%ld tid=%ld)", rc, c[0].ret, c[1].ret);
	CHECK(call(&ch, OP_PING, 0, 0, 0) == 1 && not_traced(ch.pid), "zombie leader: child healthy");
	finish_child(&ch);
}

static void test_errors(void)
{
	struct uf_syscall c = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
	pid_t dead = fork();
	int rc;

	if (dead == 0)
		_exit(0);
	waitpid(dead, NULL, 0);
	rc = uf_inject(dead, &c, 1);
	CHECK(rc == -ESRCH && c.ret == -ECANCELED, "errors: pid that does not exist -> %d (ret %ld)", rc, c.ret);
	CHECK(uf_inject(0, &c, 1) == -EINVAL && uf_inject(getpid(), &c, 1) == -EINVAL, "errors: pid 0 / self -> -EINVAL");
	{
		struct child ch = spawn(mt_body);
		WAIT_FOR(sh->ready, 5000);
		CHECK(uf_inject(ch.pid, &c, -1) == -EINVAL && uf_inject(ch.pid, NULL, 1) == -EINVAL &&
			      uf_inject(sh->tids[2], &c, 1) == -EINVAL,
		      "errors: n < 0, NULL calls, a non-leader tid -> -EINVAL");
		CHECK(not_traced(ch.pid), "errors: nothing left attached");
		finish_child(&ch);
	}

	/* already traced by another tracer */
	{
		struct child ch = spawn(mt_body);
		int p[2];
		pid_t tracer;
		char b;

		WAIT_FOR(sh->ready, 5000);
		if (pipe(p))
			return;
		tracer = fork();
		if (tracer == 0) {
			int st;
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (ptrace(PTRACE_ATTACH, ch.pid, 0, 0) == 0) {
				waitpid(ch.pid, &st, 0);
				ptrace(PTRACE_CONT, ch.pid, 0, 0);
			}
			if (write(p[1], "x", 1) != 1)
				_exit(1);
			for (;;)
				pause();
		}
		close(p[1]);
		if (read(p[0], &b, 1) != 1)
			b = 0;
		close(p[0]);
		CHECK(status_field(ch.pid, "\nTracerPid:") == tracer, "errors: child traced by a tracer process");
		rc = uf_inject(ch.pid, &c, 1);
		CHECK(rc == -EPERM && c.ret == -ECANCELED, "errors: already traced -> %d", rc);
		CHECK(status_field(ch.pid, "\nTracerPid:") == tracer, "errors: the other tracer is still in charge");
		kill(tracer, SIGKILL);
		waitpid(tracer, NULL, 0);
		CHECK(WAIT_FOR(not_traced(ch.pid), 2000) && call(&ch, OP_PING, 0, 0, 0) == 1,
		      "errors: child healthy after that tracer left");
		rc = uf_inject(ch.pid, &c, 1);
		CHECK(rc == 0 && c.ret == ch.pid, "errors: then injecting works (rc=%d)", rc);
		finish_child(&ch);
	}
}

/* The target dies during a session: by _exit() from one of its own threads (between
 * sessions, since its threads are stopped during one) or by SIGKILL from outside (truly
 * during one).  Never a hang, and the exit status still reaches the real parent. */
static void exit_body(void)
{
	start_thread(busy_thread, NULL);
	start_thread(sleeper_thread, NULL);
	sh->ready = 1;
}

static void *exit_timer_thread(void *arg)
{
	(void)arg;
	sleep_ms(40);
	_exit(7);
	return NULL;
}

static void exit_timer_body(void)
{
	exit_body();
	start_thread(exit_timer_thread, NULL);
}

static int run_until_gone(pid_t pid, int *n_ok, int *n_esrch, int *bad_ret)
{
	enum { N = 10000 };
	struct uf_syscall *c = calloc(N, sizeof(*c));
	int other = 0;

	for (int round = 0; round < 200; round++) {
		int rc, seen_cancel = 0;
		for (int j = 0; j < N; j++)
			c[j] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
		rc = uf_inject(pid, c, N);
		for (int j = 0; j < N; j++) {
			if (c[j].ret == -ECANCELED)
				seen_cancel = 1;
			else if (c[j].ret != pid || seen_cancel)
				(*bad_ret)++;
		}
		if (rc == 0)
			(*n_ok)++;
		else if (rc == -ESRCH)
			(*n_esrch)++;
		else
			other++;
		if (rc)
			break;
	}
	free(c);
	return other;
}

static void *killer_thread(void *arg)
{
	struct kill_later *k = arg;
	usleep((useconds_t)k->delay_us);
	kill(k->pid, SIGKILL);
	return NULL;
}

static void test_exit(void)
{
	/* _exit(7) from the target's timer thread */
	for (int i = 0; i < 3; i++) {
		struct child ch = spawn(exit_timer_body);
		int ok = 0, esrch = 0, badret = 0, other, st = 0;

		WAIT_FOR(sh->ready, 2000);
		other = run_until_gone(ch.pid, &ok, &esrch, &badret);
		while (waitpid(ch.pid, &st, 0) < 0 && errno == EINTR)
			;
		CHECK(other == 0 && esrch == 1 && badret == 0 && WIFEXITED(st) && WEXITSTATUS(st) == 7,
		      "exit: target _exit(7)s between sessions: %d ok, then -ESRCH; parent gets status 7 (st=%#x)", ok,
		      st);
		ch.pid = -1;
		finish_child(&ch);
	}
	/* SIGKILL from outside at a random time during a session */
	for (int i = 0; i < 6; i++) {
		struct child ch = spawn(i % 2 ? exit_body : nop_body);
		struct kill_later k;
		pthread_t t;
		int ok = 0, esrch = 0, badret = 0, other, st = 0;

		WAIT_FOR(i % 2 ? sh->ready : 1, 2000);
		k.pid = ch.pid;
		k.delay_us = 3000 + (int)(now_ns() % 20000);
		pthread_create(&t, NULL, killer_thread, &k);
		other = run_until_gone(ch.pid, &ok, &esrch, &badret);
		pthread_join(t, NULL);
		while (waitpid(ch.pid, &st, 0) < 0 && errno == EINTR)
			;
		CHECK(other == 0 && esrch == 1 && badret == 0 && WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL,
		      "exit: SIGKILL during a session (%s target): %d ok, then -ESRCH; parent sees SIGKILL (st=%#x)",
		      i % 2 ? "3-thread" : "1-thread", ok, st);
		ch.pid = -1;
		finish_child(&ch);
	}
	/* we are NOT the parent: the exit must still reach the real parent (a middle process) */
	for (int i = 0; i < 2; i++) {
		int p[2], st = -1, ok = 0, esrch = 0, badret = 0, other;
		pid_t middle, target = 0;
		struct kill_later k;
		pthread_t t;

		memset((void *)sh, 0, sizeof(*sh));
		if (pipe(p))
			return;
		middle = fork();
		if (middle == 0) {
			pid_t tp;
			int s2;
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			tp = fork();
			if (tp == 0) {
				prctl(PR_SET_PDEATHSIG, SIGKILL);
				if (i)
					exit_body();
				for (;;)
					pause();
			}
			if (write(p[1], &tp, sizeof(tp)) != sizeof(tp))
				_exit(1);
			waitpid(tp, &s2, 0);
			if (write(p[1], &s2, sizeof(s2)) != sizeof(s2))
				_exit(1);
			_exit(0);
		}
		if (read(p[0], &target, sizeof(target)) != sizeof(target))
			target = 0;
		WAIT_FOR(i ? sh->ready : 1, 2000);
		k.pid = target;
		k.delay_us = 3000 + (int)(now_ns() % 20000);
		pthread_create(&t, NULL, killer_thread, &k);
		other = run_until_gone(target, &ok, &esrch, &badret);
		pthread_join(t, NULL);
		{
			struct pollfd pf = { p[0], POLLIN, 0 };
			if (poll(&pf, 1, 3000) != 1 || read(p[0], &st, sizeof(st)) != sizeof(st))
				st = -1;
		}
		CHECK(other == 0 && esrch == 1 && badret == 0 && st != -1 && WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL,
		      "exit: SIGKILL during a session, we are not the parent (%s): the parent still gets the status (st=%#x)",
		      i ? "3-thread" : "1-thread", st);
		close(p[0]);
		close(p[1]);
		kill(middle, SIGKILL);
		waitpid(middle, NULL, 0);
	}
}

/* ---- rseq: a thread stopped inside a restartable sequence must take its abort path ---- */

extern void uf_test_rseq_spin(volatile uint64_t *rseq_cs_field, volatile uint64_t *aborts,
			      volatile uint64_t *spins);
__asm__(".pushsection .data\n"
	".balign 32\n"
	"uf_test_rseq_cs:\n"
	"	.long 0, 0\n"
	"	.quad .Luf_rseq_start, .Luf_rseq_post - .Luf_rseq_start, .Luf_rseq_abort\n"
	".popsection\n"
	".text\n"
	".globl uf_test_rseq_spin\n"
	".type uf_test_rseq_spin, @function\n"
	"uf_test_rseq_spin:\n"
	".Luf_rseq_arm:\n"
	"	leaq uf_test_rseq_cs(%rip), %rax\n"
	"	movq %rax, (%rdi)\n"
	".Luf_rseq_start:\n" /* the critical section: spins forever until aborted */
	"	incq (%rdx)\n"
	"	jmp .Luf_rseq_start\n"
	".Luf_rseq_post:\n"
	"	.long 0x53053053\n" /* RSEQ_SIG, required right before the abort handler */
	".Luf_rseq_abort:\n"
	"	incq (%rsi)\n"
	"	jmp .Luf_rseq_arm\n"
	".size uf_test_rseq_spin, .-uf_test_rseq_spin\n");

extern const ptrdiff_t __rseq_offset;
extern const unsigned int __rseq_size;

static void *rseq_thread(void *arg)
{
	char *tp;

	(void)arg;
	__asm__ volatile("mov %%fs:0, %0" : "=r"(tp));
	sh->tids[1] = (int)sys_gettid();
	if (__rseq_size == 0) { /* glibc did not register rseq (GLIBC_TUNABLES=glibc.pthread.rseq=0?) */
		sh->rseq_ready = -1;
		return NULL;
	}
	sh->rseq_area[1] = (uint64_t)(uintptr_t)(tp + __rseq_offset);
	sh->rseq_ready = 1;
	uf_test_rseq_spin((volatile uint64_t *)(tp + __rseq_offset + 8), &sh->rseq_aborts, &sh->rseq_spins);
	return NULL;
}

static void rseq_body(void)
{
	char *tp;

	__asm__ volatile("mov %%fs:0, %0" : "=r"(tp));
	sh->rseq_area[0] = (uint64_t)(uintptr_t)(tp + __rseq_offset);
	install(SIGUSR2, SA_RESTART);
	start_thread(rseq_thread, NULL);
}

static void test_rseq(void)
{
	struct child ch = spawn(rseq_body);
	int bad = 0, rc = 0, unarmed = 0;
	long r = 0;

	WAIT_FOR(sh->rseq_ready, 2000);
	if (sh->rseq_ready != 1) {
		printf("skip rseq: glibc did not register rseq\n");
		finish_child(&ch);
		return;
	}
	for (int i = 0; i < 50; i++) {
		uint64_t a;
		/* the leader (blocked in read()) runs the call; the spinner is only stopped */
		r = inject1(ch.pid, SYS_getpid, 0, 0, 0, 0, 0, 0, &rc);
		if (rc != 0 || r != ch.pid)
			bad++;
		/* still armed?  A signal delivered inside the section must abort it. */
		a = sh->rseq_aborts;
		syscall(SYS_tgkill, ch.pid, sh->tids[1], SIGUSR2);
		if (!WAIT_FOR(sh->rseq_aborts > a, 500))
			unarmed++;
	}
	CHECK(bad == 0 && unarmed == 0, "rseq: leader sessions leave the spinner's critical section armed (%d bad, %d unarmed)",
	      bad, unarmed);
	finish_child(&ch);
}

/* Same, but the spinner itself is the injection thread (its leader has exited). */
static void rseq_zl_body(void)
{
	install(SIGUSR2, SA_RESTART);
	start_thread(rseq_thread, NULL);
	while (!sh->rseq_ready)
		sleep_ms(1);
	pthread_exit(NULL);
}

static void test_rseq_injection_thread(void)
{
	struct child ch = spawn(rseq_zl_body);
	int bad = 0, rc = 0, unarmed = 0, aborted = 0;
	long r = 0;

	WAIT_FOR(sh->rseq_ready && task_state(ch.pid, ch.pid) == 'Z', 2000);
	if (sh->rseq_ready != 1) {
		printf("skip rseq: glibc did not register rseq\n");
		finish_child(&ch);
		return;
	}
	for (int i = 0; i < 50; i++) {
		uint64_t a = sh->rseq_aborts;
		r = inject1(ch.pid, SYS_gettid, 0, 0, 0, 0, 0, 0, &rc);
		if (rc != 0 || r != sh->tids[1])
			bad++;
		if (WAIT_FOR(sh->rseq_aborts > a, 200))
			aborted++;
		a = sh->rseq_aborts;
		syscall(SYS_tgkill, ch.pid, sh->tids[1], SIGUSR2);
		if (!WAIT_FOR(sh->rseq_aborts > a, 500))
			unarmed++;
	}
	CHECK(bad == 0 && unarmed == 0 && aborted == 50,
	      "rseq: injecting from a thread stopped in a critical section aborts it (%d/50 aborted, %d bad, %d unarmed)",
	      aborted, bad, unarmed);
	finish_child(&ch);
}


/* UF_CALL_RSEQ_AREAS: the stopped threads' rseq areas (injection thread first), without
 * resuming anyone; mixed with real calls; bad arguments. */
static void test_rseq_areas(void)
{
	struct child ch = spawn(rseq_body);
	uint64_t areas[8];
	struct uf_syscall c[3];
	int rc, bad = 0;

	WAIT_FOR(sh->rseq_ready, 2000);
	if (sh->rseq_ready != 1) {
		printf("skip rseq areas: glibc did not register rseq\n");
		finish_child(&ch);
		return;
	}
	memset(areas, 0, sizeof(areas));
	c[0] = sc(UF_CALL_RSEQ_AREAS, (long)(uintptr_t)areas, 4, 0, 0, 0, 0);
	rc = uf_inject(ch.pid, c, 1);
	CHECK(rc == 0 && c[0].ret == 2 && areas[0] == sh->rseq_area[0] && areas[1] >= 20 &&
		      areas[2] == sh->rseq_area[1] && areas[3] >= 20,
	      "rseq areas: leader's first, then the spinner's (rc=%d ret=%ld, %#llx/%llu %#llx/%llu, want %#llx %#llx)",
	      rc, c[0].ret, (unsigned long long)areas[0], (unsigned long long)areas[1],
	      (unsigned long long)areas[2], (unsigned long long)areas[3],
	      (unsigned long long)sh->rseq_area[0], (unsigned long long)sh->rseq_area[1]);

	/* a session of only pseudo-calls never resumes the leader (blocked in read()) */
	for (int i = 0; i < 100; i++) {
		c[0] = sc(UF_CALL_RSEQ_AREAS, (long)(uintptr_t)areas, 4, 0, 0, 0, 0);
		if (uf_inject(ch.pid, c, 1) != 0 || c[0].ret != 2)
			bad++;
	}
	CHECK(bad == 0 && sh->cmd_bad == 0 && call(&ch, OP_PING, 0, 0, 0) == 1 && not_traced(ch.pid),
	      "rseq areas: 100 query-only sessions, leader undisturbed (%d bad, %llu EINTR)", bad,
	      (unsigned long long)sh->cmd_bad);

	/* mixed with real calls, in any position; capacity 0 counts; capacity 1 truncates */
	c[0] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
	c[1] = sc(UF_CALL_RSEQ_AREAS, 0, 0, 0, 0, 0, 0);
	c[2] = sc(SYS_gettid, 0, 0, 0, 0, 0, 0);
	rc = uf_inject(ch.pid, c, 3);
	CHECK(rc == 0 && c[0].ret == ch.pid && c[1].ret == 2 && c[2].ret == ch.pid,
	      "rseq areas: between real calls, capacity 0 (rc=%d: %ld %ld %ld)", rc, c[0].ret, c[1].ret, c[2].ret);
	memset(areas, 0, sizeof(areas));
	c[0] = sc(UF_CALL_RSEQ_AREAS, (long)(uintptr_t)areas, 1, 0, 0, 0, 0);
	rc = uf_inject(ch.pid, c, 1);
	CHECK(rc == 0 && c[0].ret == 2 && areas[0] == sh->rseq_area[0] && areas[2] == 0,
	      "rseq areas: capacity 1 stores one, counts two (ret=%ld)", c[0].ret);
	c[0] = sc(UF_CALL_RSEQ_AREAS, 0, 4, 0, 0, 0, 0);
	c[1] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
	rc = uf_inject(ch.pid, c, 2);
	CHECK(rc == 0 && c[0].ret == -EINVAL && c[1].ret == ch.pid,
	      "rseq areas: NULL buffer -> -EINVAL, the session goes on (rc=%d ret=%ld)", rc, c[0].ret);
	CHECK(call(&ch, OP_PING, 0, 0, 0) == 1 && not_traced(ch.pid) && sh->cmd_bad == 0,
	      "rseq areas: child healthy");
	finish_child(&ch);
}

/* UF_CALL_UNLESS_RSEQ skips the next call when its range holds the injection thread's rseq
 * area; UF_CALL_IF_SAME_FILE cancels the rest of the session unless the target's fd is the
 * caller's open file. */
static void test_guards(void)
{
	int shared = open("/dev/null", O_RDONLY | O_CLOEXEC), other = open("/dev/null", O_RDONLY | O_CLOEXEC);
	struct child ch;
	struct uf_syscall c[6];
	uint64_t a, page = (uint64_t)sysconf(_SC_PAGESIZE);
	int rc;

	fcntl(shared, F_SETFD, 0); /* the child inherits this very open file */
	ch = spawn(rseq_body);
	WAIT_FOR(sh->rseq_ready, 2000);
	if (sh->rseq_ready != 1) {
		printf("skip guards: glibc did not register rseq\n");
		finish_child(&ch);
		close(shared);
		close(other);
		return;
	}
	a = sh->rseq_area[0]; /* the leader's: the leader runs the calls */
	c[0] = sc(UF_CALL_UNLESS_RSEQ, (long)(a & ~(page - 1)) + (long)page, (long)page, 0, 0, 0, 0); /* next page */
	c[1] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
	c[2] = sc(UF_CALL_UNLESS_RSEQ, (long)(a & ~(page - 1)) - (long)page, 2 * (long)page, 0, 0, 0, 0);
	c[3] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
	c[4] = sc(UF_CALL_UNLESS_RSEQ, (long)sh->rseq_area[1], 8, 0, 0, 0, 0); /* another thread's */
	c[5] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
	rc = uf_inject(ch.pid, c, 6);
	CHECK(rc == 0 && c[0].ret == 0 && c[1].ret == ch.pid && c[2].ret == 1 && c[3].ret == -EDEADLK &&
		      c[4].ret == 0 && c[5].ret == ch.pid,
	      "guards: UNLESS_RSEQ skips only a call whose range holds the injection thread's rseq page "
	      "(rc=%d: %ld %ld %ld %ld %ld %ld)",
	      rc, c[0].ret, c[1].ret, c[2].ret, c[3].ret, c[4].ret, c[5].ret);

	c[0] = sc(UF_CALL_IF_SAME_FILE, shared, shared, 0, 0, 0, 0);
	c[1] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
	c[2] = sc(UF_CALL_IF_SAME_FILE, shared, other, 0, 0, 0, 0);
	c[3] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
	rc = uf_inject(ch.pid, c, 4);
	CHECK(rc == 0 && c[0].ret == 0 && c[1].ret == ch.pid && c[2].ret == 1 && c[3].ret == -ECANCELED,
	      "guards: IF_SAME_FILE runs the rest only for the same open file (rc=%d: %ld %ld %ld %ld)", rc, c[0].ret,
	      c[1].ret, c[2].ret, c[3].ret);
	c[0] = sc(UF_CALL_IF_SAME_FILE, 999, shared, 0, 0, 0, 0);
	c[1] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
	rc = uf_inject(ch.pid, c, 2);
	CHECK(rc == 0 && c[0].ret == -EBADF && c[1].ret == -ECANCELED,
	      "guards: IF_SAME_FILE on a closed fd -> -EBADF, rest cancelled (rc=%d: %ld %ld)", rc, c[0].ret, c[1].ret);
	CHECK(call(&ch, OP_PING, 0, 0, 0) == 1 && not_traced(ch.pid) && sh->cmd_bad == 0, "guards: child healthy");
	finish_child(&ch);
	close(shared);
	close(other);
}

/* Another thread of the CALLER waits for the target meanwhile (Popen.wait() in a thread,
 * a SIGCHLD handler with waitpid(-1), asyncio's child watcher): the kernel hands it our
 * ptrace stops.  uf_inject() must notice and go on, never wait forever. */
struct stealer {
	pid_t pid;
	int any;                /* waitpid(-1, WNOHANG) in a loop, else a blocking waitpid(pid) */
	volatile int stop;
	volatile long stolen, other;
};

static void *stealer_thread(void *arg)
{
	struct stealer *st = arg;

	while (!st->stop) {
		int w;
		pid_t r = st->any ? waitpid(-1, &w, WNOHANG) : waitpid(st->pid, &w, 0);
		if (r > 0 && WIFSTOPPED(w))
			st->stolen++;
		else if (r > 0)
			st->other++;
	}
	return NULL;
}

static void test_stolen_stops(void)
{
	for (int k = 0; k < 4; k++) {
		int mt = k & 1, any = k >> 1, bad = 0, rc = 0;
		struct child ch = spawn(mt ? mt_body : nop_body);
		struct stealer st = { ch.pid, any, 0, 0, 0 };
		pthread_t t;
		uint64_t t0;

		WAIT_FOR(mt ? sh->ready : 1, 5000);
		pthread_create(&t, NULL, stealer_thread, &st);
		t0 = now_ns();
		for (int i = 0; i < 200; i++) {
			struct uf_syscall c[4];
			for (int j = 0; j < 4; j++)
				c[j] = sc(j & 1 ? SYS_gettid : SYS_getpid, 0, 0, 0, 0, 0, 0);
			rc = uf_inject(ch.pid, c, 4);
			for (int j = 0; j < 4; j++)
				if (rc || c[j].ret != ch.pid)
					bad++;
		}
		t0 = now_ns() - t0;
		st.stop = 1;
		if (!any)
			pthread_cancel(t); /* waitpid() is a cancellation point */
		pthread_join(t, NULL);
		CHECK(bad == 0 && st.stolen > 0 && st.other == 0,
		      "stolen stops: %s target, %s in another thread: 200 sessions ok (%d bad, %ld stops stolen, %.1f ms)",
		      mt ? "5-thread" : "1-thread", any ? "waitpid(-1, WNOHANG) loop" : "blocking waitpid(pid)", bad,
		      st.stolen, (double)t0 / 1e6);
		CHECK(call(&ch, OP_PING, 0, 0, 0) == 1 && not_traced(ch.pid) &&
			      (!mt || (sh->busy_bad == 0 && sh->read_bad == 0 && sh->sleep_bad == 0 && sh->cmd_bad == 0)),
		      "stolen stops: target healthy afterwards");
		finish_child(&ch);
	}
}

/* ---- concurrency: two caller threads, two targets ------------------------------------------- */

struct par {
	pid_t pid;
	int bad;
};

static void *par_thread(void *arg)
{
	struct par *p = arg;

	for (int i = 0; i < 200; i++) {
		int rc;
		long r = inject1(p->pid, SYS_getpid, 0, 0, 0, 0, 0, 0, &rc);
		if (rc || r != p->pid)
			p->bad++;
	}
	return NULL;
}

static void test_parallel(void)
{
	struct child a = spawn(nop_body), b = spawn(nop_body);
	struct par pa = { a.pid, 0 }, pb = { b.pid, 0 };
	pthread_t ta, tb;

	pthread_create(&ta, NULL, par_thread, &pa);
	pthread_create(&tb, NULL, par_thread, &pb);
	pthread_join(ta, NULL);
	pthread_join(tb, NULL);
	CHECK(pa.bad == 0 && pb.bad == 0, "parallel: two threads x 200 sessions on two targets (%d, %d bad)", pa.bad,
	      pb.bad);
	CHECK(call(&a, OP_PING, 0, 0, 0) == 1 && call(&b, OP_PING, 0, 0, 0) == 1 && not_traced(a.pid) &&
		      not_traced(b.pid),
	      "parallel: both targets healthy");
	finish_child(&a);
	finish_child(&b);
}

/* ---- timing (printed, not checked) -------------------------------------------------------- */

static void timing(void)
{
	struct uf_syscall c[100];
	const char *names[2] = { "1 thread", "5 threads" };

	for (int k = 0; k < 2; k++) {
		struct child ch = spawn(k ? mt_body : nop_body);
		WAIT_FOR(k ? sh->ready : 1, 5000);
		sleep_ms(20);
		for (int n = 1; n <= 100; n *= 100) {
			uint64_t best = UINT64_MAX, total = 0;
			int reps = n == 1 ? 200 : 50;
			for (int i = 0; i < reps; i++) {
				uint64_t t0;
				for (int j = 0; j < n; j++)
					c[j] = sc(SYS_getpid, 0, 0, 0, 0, 0, 0);
				t0 = now_ns();
				uf_inject(ch.pid, c, n);
				t0 = now_ns() - t0;
				total += t0;
				if (t0 < best)
					best = t0;
			}
			printf("time %-9s target, %3d call(s)/session: mean %7.1f us, best %7.1f us\n", names[k], n,
			       (double)total / reps / 1000.0, (double)best / 1000.0);
		}
		finish_child(&ch);
	}
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";

	setvbuf(stdout, NULL, _IOLBF, 0);
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED)
		return 2;
	signal(SIGPIPE, SIG_IGN);
	alarm(300); /* a hang is a failure */

	if (strcmp(mode, "--timing-only")) {
		test_basic();
		test_memory();
		test_threads();
		test_blocked_leader();
		test_signal_eintr();
		test_signals(0);
		test_signals(1);
		test_sigstop();
		test_stopped();
		test_zombie_leader();
		test_errors();
		test_exit();
		test_rseq();
		test_rseq_injection_thread();
		test_rseq_areas();
		test_guards();
		test_stolen_stops();
		test_parallel();
	}
	if (strcmp(mode, "--no-timing"))
		timing();

	printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
	return failures ? 1 : 0;
}

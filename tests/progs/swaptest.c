/*
 * swaptest - a target for userspace swap tests: a big anonymous buffer whose every
 * page says what it must contain, read and written by several threads with a chosen
 * access pattern, every page verified on every access and all of them at the end.
 *
 * Page layout: word 0 = page index, word 1 = version, words 2..511 = a function of
 * (index, version) - half of them pseudo-random, half constant (LZ4 gets about 2x).
 * Some pages are never written (must read as zeros); each thread owns the pages
 * i % nthreads == t (no torn reads between threads).  A write bumps the version and
 * rewrites the page - while the manager may be evicting it.
 *
 * usage: swaptest MiB PATTERN OPS THREADS WRITE% [EVENTS]
 *   PATTERN: seq | rand | zipf (s = 0.99)      OPS: accesses per thread
 *   EVENTS: letters run by thread 0 midway:  f = fork (child verifies and rewrites its
 *   copy, parent checks its own is unchanged), m = munmap the last 1/16 of the buffer,
 *   r = mremap the buffer to a new address, d = madvise(DONTNEED) a slice (must read
 *   zeros), all after the other threads stopped for the event.
 * SWAPTEST_PAUSE_MS=N: sleep N ms after the fill, before the threads start.
 * SWAPTEST_CHURN=N: one more thread, while the others run, unmaps an N-page area and maps
 *   a new one at the same address with raw syscalls (as glibc's malloc does for big blocks:
 *   nobody registers the new mapping), fills it, and checks it - again and again.  A page
 *   of the old mapping that was being evicted must never take the new one's data with it.
 * SWAPTEST_FORKS=N: one more thread, while the others run, reads an N-page area that
 *   never changes, forks a child that forks a grandchild, and both check the area -
 *   again and again, forks landing in eviction batches.
 * SWAPTEST_WRITER=N (with SWAPTEST_FORKS): SWAPTEST_WRITERS threads more (default 1)
 *   rewrite random pages of an N-page area whole, writing first (no read before: a page
 *   that was evicted comes back on a write fault), while the forks go on; each fork's
 *   child checks that area as it was at the fork - a page being written then may be torn
 *   between its two versions, never zeros.  The versions and the pages being written
 *   live in the area's first pages (one mapping: the fork copies them with the data).
 * Prints "ok checked=N" and exits 0, or prints the first mismatch and exits 1.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint8_t *buf;
static size_t npages, live_pages;
static int nthreads, write_pct;
static long ops;
static const char *pattern;
static const char *events = "";
static uint64_t checked;
static pthread_barrier_t bar;

static uint64_t mix(uint64_t x)
{
	x ^= x >> 31;
	x *= 0x7fb5d329728ea185ULL;
	x ^= x >> 27;
	x *= 0x81dadef4bc2dd44dULL;
	x ^= x >> 33;
	return x;
}

static void fill(uint64_t *p, uint64_t idx, uint64_t ver)
{
	uint64_t s = mix(idx * 1000003 + ver);
	p[0] = idx;
	p[1] = ver;
	for (int i = 2; i < WORDS; i++)
		p[i] = (i & 1) ? (s = mix(s + i)) : (idx ^ (ver << 40));
}

/* 0 when page idx holds version ver's content (ver 0: all zeros) */
static int verify(const uint64_t *p, uint64_t idx, uint64_t *ver_out)
{
	uint64_t ver = p[1], s;
	if (p[0] == 0 && ver == 0) {
		for (int i = 0; i < WORDS; i++)
			if (p[i])
				return -1;
		*ver_out = 0;
		return 0;
	}
	if (p[0] != idx)
		return -2;
	s = mix(idx * 1000003 + ver);
	for (int i = 2; i < WORDS; i++)
		if (p[i] != ((i & 1) ? (s = mix(s + i)) : (idx ^ (ver << 40))))
			return -3;
	*ver_out = ver;
	return 0;
}

static void fail(const char *what, uint64_t idx, int why, const uint64_t *p)
{
	fprintf(stderr, "MISMATCH %s page %lu (why %d): word0=%lu word1=%lu word2=%lx\n", what,
		(unsigned long)idx, why, (unsigned long)p[0], (unsigned long)p[1], (unsigned long)p[2]);
	fflush(stderr);
	_exit(1);
}

struct thr {
	int t;
	uint64_t rng;
	uint64_t *expect; /* expected version of each owned page (in managed memory too) */
};

static uint64_t next(struct thr *th)
{
	return th->rng = mix(th->rng + 0x9e3779b97f4a7c15ULL);
}

/* zipf over [0, n): inverse-CDF approximation for s close to 1 */
static size_t zipf(struct thr *th, size_t n)
{
	double u = (double)(next(th) >> 11) / (double)(1ULL << 53);
	double x = pow((double)n + 1.0, u) - 1.0; /* s = 1 */
	size_t k = (size_t)x;
	return k < n ? k : n - 1;
}

static void access_page(struct thr *th, size_t k)
{
	size_t idx = k * (size_t)nthreads + (size_t)th->t;
	uint64_t *p, ver;
	int r;

	if (idx >= live_pages)
		return;
	p = (uint64_t *)(buf + idx * PAGE);
	r = verify(p, idx, &ver);
	if (r || ver != th->expect[k])
		fail("read", idx, r ? r : -4, p);
	__atomic_fetch_add(&checked, 1, __ATOMIC_RELAXED);
	if ((int)(next(th) % 100) < write_pct) {
		fill(p, idx, ver + 1);
		th->expect[k] = ver + 1;
	}
}

static void run_events(void);

/* SWAPTEST_MIN_MS: the threads go on with more accesses of the same pattern after OPS
 * until so many milliseconds have passed since they started (a test that kills the
 * manager mid-run needs a run that is still going then, on a fast host too) */
static uint64_t min_ns, start_ns;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static size_t pick(struct thr *th, long i, size_t own)
{
	if (!strcmp(pattern, "seq"))
		return (size_t)i % own;
	if (!strcmp(pattern, "zipf"))
		return mix(zipf(th, own)) % own; /* hot pages scattered, not clustered */
	return next(th) % own;
}

static void *worker(void *arg)
{
	struct thr *th = arg;
	size_t own = (npages + (size_t)nthreads - 1) / (size_t)nthreads;
	long i;

	for (i = 0; i < ops; i++) {
		if (i == ops / 2 && *events) {
			pthread_barrier_wait(&bar);
			if (th->t == 0)
				run_events();
			pthread_barrier_wait(&bar);
			own = (live_pages + (size_t)nthreads - 1) / (size_t)nthreads;
		}
		access_page(th, pick(th, i, own));
	}
	for (; min_ns && now_ns() - start_ns < min_ns; i++)
		access_page(th, pick(th, i, own));
	/* final full check of owned pages */
	for (size_t k = 0; k < own; k++)
		access_page(th, k);
	return th;
}

static struct thr *threads;

static volatile int churn_stop;
static unsigned long churn_rounds;

/* SWAPTEST_WRITER: the area's first pages hold, for each writer thread t (page i is
 * thread i % nwriters's), wmeta[t] = the page it is writing (+1; 0: none), wmeta[WMAX + t]
 * = how many it wrote, wmeta[WRING + t * WRECENT + k % WRECENT] = the last ones; and
 * wmeta[WVER + i] = page i's version.  The pages follow, in the same mapping. */
#define WMAX 8
#define WRECENT 16
#define WRING (2 * WMAX)
#define WVER (WRING + WMAX * WRECENT)
static volatile uint64_t *wmeta;
static uint8_t *wdata;
static size_t wpages, nwriters;

static void *writer(void *arg)
{
	size_t t = (size_t)arg, own = (wpages - t + nwriters - 1) / nwriters;
	uint64_t rng = 12345 + t;

	while (!churn_stop) {
		size_t i = (size_t)((rng = mix(rng + 0x9e3779b97f4a7c15ULL)) % own) * nwriters + t;
		uint64_t ver = wmeta[WVER + i] + 1;
		wmeta[t] = i + 1;
		fill((uint64_t *)(wdata + i * PAGE), (3ULL << 40) + i, ver); /* writes word 0 first */
		wmeta[WVER + i] = ver;
		wmeta[WRING + t * WRECENT + wmeta[WMAX + t] % WRECENT] = i;
		wmeta[WMAX + t]++;
		wmeta[t] = 0;
	}
	return NULL;
}

/* In a fork child: page i of the writers' area as it was at the fork. */
static void check_writer_page(const char *who, size_t i)
{
	const uint64_t *p = (const uint64_t *)(wdata + i * PAGE);
	uint64_t ver, idx = (3ULL << 40) + i, v = wmeta[WVER + i];

	if (i + 1 == wmeta[i % nwriters]) {
		/* being written at the fork: every word of version v or v + 1 */
		uint64_t a[WORDS], b[WORDS];
		fill(a, idx, v);
		fill(b, idx, v + 1);
		for (int w = 0; w < WORDS; w++)
			if (p[w] != a[w] && p[w] != b[w])
				fail(who, idx, -5, p);
		return;
	}
	int r = verify(p, idx, &ver);
	if (r || ver != v)
		fail(who, idx, r ? r : -4, p);
}

/* The pages being written and the last ones written (most likely to have come back on a
 * write fault just before the fork), and every page at every 16th fork. */
static void check_writer(const char *who)
{
	for (size_t t = 0; t < nwriters; t++) {
		size_t n = wmeta[WMAX + t] < WRECENT ? (size_t)wmeta[WMAX + t] : WRECENT;
		if (wmeta[t])
			check_writer_page(who, (size_t)wmeta[t] - 1);
		for (size_t k = 0; k < n; k++)
			check_writer_page(who, (size_t)wmeta[WRING + t * WRECENT + k]);
	}
	if (churn_rounds % 16 == 0)
		for (size_t i = 0; i < wpages; i++)
			check_writer_page(who, i);
}

static void *forker(void *arg)
{
	size_t n = (size_t)arg;
	uint64_t ver;
	char *a = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (a == MAP_FAILED) {
		perror("forks mmap");
		_exit(2);
	}
	madvise(a, n * PAGE, MADV_NOHUGEPAGE);
	for (size_t i = 0; i < n; i++)
		fill((uint64_t *)(a + i * PAGE), (2ULL << 40) + i, 7);
	while (!churn_stop) {
		for (size_t i = 0; i < n; i++) {
			int r = verify((const uint64_t *)(a + i * PAGE), (2ULL << 40) + i, &ver);
			if (r || ver != 7)
				fail("forks parent", (2ULL << 40) + i, r ? r : -4, (const uint64_t *)(a + i * PAGE));
		}
		pid_t pid = fork();
		if (pid == 0) {
			if (wpages)
				check_writer("writer's area in fork child");
			pid_t g = fork();
			for (size_t i = 0; i < n; i++) {
				int r = verify((const uint64_t *)(a + i * PAGE), (2ULL << 40) + i, &ver);
				if (r || ver != 7)
					fail(g == 0 ? "forks grandchild" : "forks child", (2ULL << 40) + i, r ? r : -4,
					     (const uint64_t *)(a + i * PAGE));
			}
			if (g == 0)
				_exit(0);
			int st = 0;
			waitpid(g, &st, 0);
			_exit(WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1);
		}
		int st = 0;
		waitpid(pid, &st, 0);
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
			fprintf(stderr, "MISMATCH forks child or grandchild failed (status %d)\n", st);
			_exit(1);
		}
		churn_rounds++;
		usleep(1000 + (unsigned)(mix(churn_rounds) % 4000));
	}
	return NULL;
}

static void *churner(void *arg)
{
	size_t n = (size_t)arg, len = n * PAGE;
	uint64_t gen = 1;
	/* raw syscalls: the agent's mmap() wrapper does not see these mappings */
	char *a = (char *)syscall(SYS_mmap, NULL, len, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (a == MAP_FAILED) {
		perror("churn mmap");
		_exit(2);
	}
	madvise(a, len, MADV_NOHUGEPAGE);
	while (!churn_stop) {
		uint64_t ver;
		for (size_t i = 0; i < n; i++)
			fill((uint64_t *)(a + i * PAGE), (1ULL << 40) + i, gen);
		/* let eviction find them: a few ms, then every page must be as written */
		usleep(1000 + (unsigned)(mix(gen) % 8000));
		for (size_t i = 0; i < n; i++) {
			int r = verify((const uint64_t *)(a + i * PAGE), (1ULL << 40) + i, &ver);
			if (r || ver != gen) {
				fprintf(stderr, "churn round %lu gen %lu page %zu of %zu\n", churn_rounds,
					(unsigned long)gen, i, n);
				fail("churn", (1ULL << 40) + i, r ? r : -4, (const uint64_t *)(a + i * PAGE));
			}
		}
		if (syscall(SYS_munmap, a, len)) {
			perror("churn munmap");
			_exit(2);
		}
		char *b = (char *)syscall(SYS_mmap, a, len, PROT_READ | PROT_WRITE,
					  MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
		if (b == MAP_FAILED) /* someone took the address: anywhere will do */
			b = (char *)syscall(SYS_mmap, NULL, len, PROT_READ | PROT_WRITE,
					    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (b == MAP_FAILED) {
			perror("churn mmap");
			_exit(2);
		}
		a = b;
		madvise(a, len, MADV_NOHUGEPAGE);
		gen++;
		churn_rounds++;
	}
	return NULL;
}

static void check_all(const char *what)
{
	for (int t = 0; t < nthreads; t++) {
		size_t own = (npages + (size_t)nthreads - 1) / (size_t)nthreads;
		for (size_t k = 0; k < own; k++) {
			size_t idx = k * (size_t)nthreads + (size_t)t;
			uint64_t ver;
			int r;
			if (idx >= live_pages)
				continue;
			r = verify((uint64_t *)(buf + idx * PAGE), idx, &ver);
			if (r || ver != threads[t].expect[k])
				fail(what, idx, r ? r : -4, (uint64_t *)(buf + idx * PAGE));
		}
	}
}

static void run_events(void)
{
	for (const char *e = events; *e; e++) {
		switch (*e) {
		case 'f': {
			pid_t pid = fork();
			if (pid == 0) {
				check_all("fork child");
				/* the child rewrites its copy: the parent's must not change */
				for (size_t i = 0; i < live_pages; i += 7)
					fill((uint64_t *)(buf + i * PAGE), i, 999999);
				_exit(0);
			}
			int st = 0;
			waitpid(pid, &st, 0);
			if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
				fprintf(stderr, "MISMATCH fork child failed (status %d)\n", st);
				_exit(1);
			}
			check_all("fork parent");
			break;
		}
		case 'm': {
			size_t cut = live_pages / 16;
			if (munmap(buf + (live_pages - cut) * PAGE, cut * PAGE)) {
				perror("munmap");
				_exit(2);
			}
			live_pages -= cut;
			check_all("munmap");
			break;
		}
		case 'r': {
			void *n = mremap(buf, live_pages * PAGE, live_pages * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED,
					 buf + npages * PAGE + (64 << 20));
			if (n == MAP_FAILED) {
				perror("mremap");
				_exit(2);
			}
			buf = n;
			check_all("mremap");
			break;
		}
		case 'd': {
			/* a slice of thread 0's pages is discarded: they must read as zeros */
			size_t from = live_pages / 3, len = live_pages / 32;
			madvise(buf + from * PAGE, len * PAGE, MADV_DONTNEED);
			for (int t = 0; t < nthreads; t++)
				for (size_t k = 0; k < (npages + nthreads - 1) / nthreads; k++) {
					size_t idx = k * nthreads + t;
					if (idx >= from && idx < from + len)
						threads[t].expect[k] = 0;
				}
			check_all("madvise");
			break;
		}
		}
	}
}

int main(int argc, char **argv)
{
	if (argc < 6) {
		fprintf(stderr, "usage: swaptest MiB PATTERN OPS THREADS WRITE%% [EVENTS]\n");
		return 2;
	}
	npages = (size_t)atol(argv[1]) * 256;
	pattern = argv[2];
	ops = atol(argv[3]);
	nthreads = atoi(argv[4]);
	write_pct = atoi(argv[5]);
	if (argc > 6)
		events = argv[6];
	/* reserve room after the buffer for the mremap event's destination */
	buf = mmap(NULL, npages * PAGE + (64 << 20) + npages * PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	/* the tail stays reserved (PROT_NONE, not managed) for the mremap event */
	mprotect(buf + npages * PAGE, (64 << 20) + npages * PAGE, PROT_NONE);
	madvise(buf, npages * PAGE, MADV_NOHUGEPAGE);
	live_pages = npages;
	/* every page but one in 8 gets content (those stay zero until written) */
	for (size_t i = 0; i < npages; i++)
		if (i % 8 != 5)
			fill((uint64_t *)(buf + i * PAGE), i, 1);
	if (getenv("SWAPTEST_PAUSE_MS")) /* idle after the fill (policies that watch stalls) */
		usleep((useconds_t)atoi(getenv("SWAPTEST_PAUSE_MS")) * 1000);
	if (getenv("SWAPTEST_MIN_MS"))
		min_ns = (uint64_t)atol(getenv("SWAPTEST_MIN_MS")) * 1000000u;
	start_ns = now_ns();
	pthread_barrier_init(&bar, NULL, (unsigned)nthreads);
	threads = calloc((size_t)nthreads, sizeof(*threads));
	pthread_t *tid = calloc((size_t)nthreads, sizeof(*tid));
	for (int t = 0; t < nthreads; t++) {
		size_t own = (npages + (size_t)nthreads - 1) / (size_t)nthreads;
		threads[t].t = t;
		threads[t].rng = mix((uint64_t)t + 77);
		threads[t].expect = calloc(own, sizeof(uint64_t));
		for (size_t k = 0; k < own; k++) {
			size_t idx = k * (size_t)nthreads + (size_t)t;
			threads[t].expect[k] = (idx < npages && idx % 8 != 5) ? 1 : 0;
		}
	}
	for (int t = 0; t < nthreads; t++) {
		pthread_create(&tid[t], NULL, worker, &threads[t]);
	}
	pthread_t ctid;
	size_t churn = getenv("SWAPTEST_CHURN") ? (size_t)atol(getenv("SWAPTEST_CHURN")) : 0;
	if (churn)
		pthread_create(&ctid, NULL, churner, (void *)churn);
	pthread_t wtid[WMAX];
	wpages = getenv("SWAPTEST_WRITER") ? (size_t)atol(getenv("SWAPTEST_WRITER")) : 0;
	nwriters = getenv("SWAPTEST_WRITERS") ? (size_t)atol(getenv("SWAPTEST_WRITERS")) : 1;
	if (nwriters < 1 || nwriters > WMAX || (wpages && wpages < nwriters)) {
		fprintf(stderr, "SWAPTEST_WRITERS: 1 to %d, at most SWAPTEST_WRITER\n", WMAX);
		return 2;
	}
	if (wpages) {
		size_t meta = (WVER + wpages) * 8 / PAGE + 1;
		uint8_t *w = mmap(NULL, (meta + wpages) * PAGE, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (w == MAP_FAILED) {
			perror("writer mmap");
			return 2;
		}
		madvise(w, (meta + wpages) * PAGE, MADV_NOHUGEPAGE);
		wmeta = (volatile uint64_t *)w;
		wdata = w + meta * PAGE;
		for (size_t i = 0; i < wpages; i++) {
			fill((uint64_t *)(wdata + i * PAGE), (3ULL << 40) + i, 1);
			wmeta[WVER + i] = 1;
		}
		for (size_t t = 0; t < nwriters; t++)
			pthread_create(&wtid[t], NULL, writer, (void *)t);
	}
	pthread_t ftid;
	size_t forks = getenv("SWAPTEST_FORKS") ? (size_t)atol(getenv("SWAPTEST_FORKS")) : 0;
	if (forks)
		pthread_create(&ftid, NULL, forker, (void *)forks);
	for (int t = 0; t < nthreads; t++)
		pthread_join(tid[t], NULL);
	churn_stop = 1;
	if (churn)
		pthread_join(ctid, NULL);
	if (forks)
		pthread_join(ftid, NULL);
	for (size_t t = 0; wpages && t < nwriters; t++)
		pthread_join(wtid[t], NULL);
	check_all("final");
	printf("ok checked=%lu pages=%zu churn=%lu\n", (unsigned long)checked, live_pages, churn_rounds);
	return 0;
}

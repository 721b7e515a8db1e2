/*
 * memtest - a C program that does to its memory what real programs do, and
 * checks every byte.  Run under management (uffdio run / Manager.spawn) with
 * eviction forced on (--churn), it exercises: malloc of small and large blocks
 * (brk heap and mmap), realloc that grows big blocks (glibc uses mremap),
 * explicit mmap/munmap, madvise(MADV_DONTNEED) (must read zeros afterwards),
 * threads that rewrite their blocks, fork (the child verifies and changes its
 * copy; the parent's copy must not change), exec of itself, and exit.
 *
 * usage: memtest [MiB] [rounds] [flags]     flags: f = fork, e = exec, t = threads
 * exit status 0: every check passed; 1: a mismatch (printed on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define NBLK 64
#define NTHR 4

struct blk {
	uint8_t *p;
	size_t len;
	uint64_t seed;
};

static struct blk blks[NBLK];
static int failed;

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	return x;
}

/* every 8 bytes depend on the seed and the offset: a page swapped with another,
 * a stale page or a zero page all fail the check */
static void fill(uint8_t *p, size_t len, uint64_t seed)
{
	for (size_t i = 0; i + 8 <= len; i += 8) {
		uint64_t v = mix(seed * 0x9e3779b97f4a7c15ULL + i);
		memcpy(p + i, &v, 8);
	}
}

static int check(const uint8_t *p, size_t len, uint64_t seed, const char *what)
{
	for (size_t i = 0; i + 8 <= len; i += 8) {
		uint64_t v = mix(seed * 0x9e3779b97f4a7c15ULL + i), got;
		memcpy(&got, p + i, 8);
		if (got != v) {
			fprintf(stderr, "memtest[%d]: %s: mismatch at offset %zu of %zu (addr %p): got %016llx want %016llx\n",
				(int)getpid(), what, i, len, (void *)(p + i), (unsigned long long)got,
				(unsigned long long)v);
			__atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
			return 1;
		}
	}
	return 0;
}

static int check_zero(const uint8_t *p, size_t len, const char *what)
{
	for (size_t i = 0; i < len; i++)
		if (p[i]) {
			fprintf(stderr, "memtest[%d]: %s: byte %zu is %u, want 0 (madvise DONTNEED)\n",
				(int)getpid(), what, i, p[i]);
			failed = 1;
			return 1;
		}
	return 0;
}

static void nap(long us)
{
	struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
	nanosleep(&ts, NULL);
}

static int check_all(const char *what)
{
	int bad = 0;
	for (int i = 0; i < NBLK; i++)
		bad |= check(blks[i].p, blks[i].len, blks[i].seed, what);
	return bad;
}

static void *worker(void *arg)
{
	int t = (int)(intptr_t)arg, rounds = 20;
	for (int r = 0; r < rounds; r++) {
		for (int i = t; i < NBLK; i += NTHR) {
			check(blks[i].p, blks[i].len, blks[i].seed, "thread check");
			blks[i].seed = mix(blks[i].seed + (uint64_t)r + 1);
			fill(blks[i].p, blks[i].len, blks[i].seed);
		}
		nap(3000);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 32;
	int rounds = argc > 2 ? atoi(argv[2]) : 10;
	const char *flags = argc > 3 ? argv[3] : "fet";
	size_t total = mib << 20, per = total / NBLK;

	/* blocks of mixed sizes: small ones come from the brk heap, big ones from mmap */
	for (int i = 0; i < NBLK; i++) {
		blks[i].len = (i % 4 == 0) ? 3 * PAGE + 100 : per;
		blks[i].p = malloc(blks[i].len);
		blks[i].seed = (uint64_t)i + 1;
		if (!blks[i].p) {
			perror("malloc");
			return 2;
		}
		fill(blks[i].p, blks[i].len, blks[i].seed);
	}
	/* an explicit mapping with a part discarded and a part unmapped */
	size_t mlen = 8 << 20;
	uint8_t *m = mmap(NULL, mlen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	fill(m, mlen, 777);

	for (int r = 0; r < rounds; r++) {
		check_all("round check");
		check(m, mlen / 2, 777, "mmap check");
		/* grow a big block: glibc moves it with mremap */
		int g = 1 + (r % (NBLK - 1));
		if (g % 4 == 0)
			g++;
		size_t nl = blks[g].len + (1 << 20);
		uint8_t *np = realloc(blks[g].p, nl);
		if (!np) {
			perror("realloc");
			return 2;
		}
		check(np, blks[g].len, blks[g].seed, "realloc keeps contents");
		blks[g].p = np;
		blks[g].len = nl;
		fill(np, nl, blks[g].seed);
		nap(5000);
	}
	/* the application's own discard: zeros, never the old (or an evicted) copy */
	madvise(m + mlen / 2, mlen / 4, MADV_DONTNEED);
	nap(20000);
	check_zero(m + mlen / 2, mlen / 4, "after MADV_DONTNEED");
	munmap(m + 3 * mlen / 4, mlen / 4);
	check(m, mlen / 2, 777, "mmap check after munmap of another part");

	if (strchr(flags, 't')) {
		pthread_t th[NTHR];
		for (int t = 0; t < NTHR; t++)
			pthread_create(&th[t], NULL, worker, (void *)(intptr_t)t);
		for (int t = 0; t < NTHR; t++)
			pthread_join(th[t], NULL);
		check_all("after threads");
	}
	if (strchr(flags, 'f')) {
		nap(30000); /* let pages be evicted: the child must see them too */
		pid_t c = fork();
		if (c == 0) {
			int bad = check_all("child sees the parent's data");
			for (int i = 0; i < NBLK; i++) { /* the child's writes stay in the child */
				fill(blks[i].p, blks[i].len, blks[i].seed + 1000);
			}
			nap(30000);
			for (int i = 0; i < NBLK; i++)
				bad |= check(blks[i].p, blks[i].len, blks[i].seed + 1000, "child rewrite");
			_exit(bad || failed);
		}
		int st;
		nap(10000);
		check_all("parent during child");
		waitpid(c, &st, 0);
		if (!WIFEXITED(st) || WEXITSTATUS(st)) {
			fprintf(stderr, "memtest: forked child failed (status %d)\n", st);
			failed = 1;
		}
		check_all("parent after child");
	}
	if (strchr(flags, 'e')) {
		pid_t c = fork();
		if (c == 0) {
			execl("/proc/self/exe", argv[0], "4", "3", "t", (char *)NULL);
			_exit(127);
		}
		int st;
		waitpid(c, &st, 0);
		if (!WIFEXITED(st) || WEXITSTATUS(st)) {
			fprintf(stderr, "memtest: exec'd child failed (status %d)\n", st);
			failed = 1;
		}
	}
	check_all("final");
	if (!failed)
		printf("memtest ok %zu MiB %d rounds\n", mib, rounds);
	return failed;
}

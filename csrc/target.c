/*
 * target.c - helpers that run inside a managed (target) process: touching
 * pages one by one with per-touch latency, writing and checking content
 * patterns, forking, threads, mremap/madvise/munmap.  The test suite, the
 * demo and `uffdio bench faults` drive them through `python -m uffdio._target`.
 * They run with the GIL released (cffi releases it around every call), and
 * only in a process whose memory some OTHER process serves.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include "uffdio.h"

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* The content of the 8-byte word at absolute address a under seed s: depends
 * on both so that a page copied to the wrong place or a stale page shows. */
static inline uint64_t pattern(uint64_t a, uint64_t s)
{
	uint64_t x = a * 0x9E3779B97F4A7C15ULL ^ s;
	x ^= x >> 29;
	x *= 0xBF58476D1CE4E5B9ULL;
	return x ^ (x >> 32);
}

int uf_set_cpu(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof(set), &set) < 0 ? -errno : 0;
}

int64_t uf_touch(uint64_t addr, uint64_t npages, uint64_t stride, int write, uint64_t *lat_ns_out)
{
	uint64_t i, sum = 0;

	if (!stride)
		stride = 4096;
	for (i = 0; i < npages; i++) {
		volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)(addr + i * stride);
		uint64_t t0 = lat_ns_out ? now_ns() : 0;
		if (write)
			*p = (uint8_t)(*p + 1);
		else
			sum += *p;
		if (lat_ns_out)
			lat_ns_out[i] = now_ns() - t0;
	}
	return (int64_t)(sum & 0x7fffffffffffffffULL);
}

/* Fill buf with the pattern that memory at as_addr has under seed: the manager
 * builds the content a target page must end up with. */
void uf_pattern(uint64_t buf, uint64_t len, uint64_t seed, uint64_t as_addr)
{
	uint64_t *w = (uint64_t *)(uintptr_t)buf, i;

	for (i = 0; i < len / 8; i++)
		w[i] = pattern(as_addr + i * 8, seed);
}

void uf_fill(uint64_t addr, uint64_t len, uint64_t seed)
{
	uf_pattern(addr, len, seed, addr);
}

/* Returns the number of bad 8-byte words (0 = every byte as written). */
int64_t uf_check(uint64_t addr, uint64_t len, uint64_t seed)
{
	const uint64_t *w = (const uint64_t *)(uintptr_t)addr;
	int64_t bad = 0;
	uint64_t i;

	for (i = 0; i < len / 8; i++)
		bad += w[i] != pattern(addr + i * 8, seed);
	return bad;
}

/* nthreads threads check interleaved slices of [addr, addr+len) at once:
 * thread k takes pages k, k+n, k+2n ... so that they fault concurrently. */
struct islice {
	uint64_t addr, len, seed;
	int k, n;
	int64_t bad;
};

static void *islice_main(void *arg)
{
	struct islice *s = arg;
	uint64_t off;

	for (off = (uint64_t)s->k * 4096; off < s->len; off += (uint64_t)s->n * 4096)
		s->bad += uf_check(s->addr + off, 4096, s->seed);
	return NULL;
}

int64_t uf_threads_check(uint64_t addr, uint64_t len, uint64_t seed, int nthreads)
{
	pthread_t th[256];
	struct islice s[256];
	int64_t bad = 0;
	int i;

	if (nthreads < 1 || nthreads > 256)
		return -EINVAL;
	for (i = 0; i < nthreads; i++) {
		s[i] = (struct islice){ addr, len, seed, i, nthreads, 0 };
		if (pthread_create(&th[i], NULL, islice_main, &s[i]))
			return -EAGAIN;
	}
	for (i = 0; i < nthreads; i++) {
		pthread_join(th[i], NULL);
		bad += s[i].bad;
	}
	return bad;
}

/* fork; the child sleeps delay_ms, checks the range and exits 0 when every word
 * is right, 1 otherwise; the parent waits and returns the child's status code. */
int uf_fork_check(uint64_t addr, uint64_t len, uint64_t seed, uint32_t delay_ms)
{
	int st;
	pid_t pid = fork();

	if (pid < 0)
		return -errno;
	if (pid == 0) {
		if (delay_ms)
			usleep(delay_ms * 1000);
		_exit(uf_check(addr, len, seed) == 0 ? 0 : 1);
	}
	if (waitpid(pid, &st, 0) < 0)
		return -errno;
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

uint64_t uf_mmap_anon(uint64_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return 0;
	/* 4 KiB granularity: a zap inside a THP frees nothing until a split */
	madvise(p, len, MADV_NOHUGEPAGE);
	return (uint64_t)(uintptr_t)p;
}

/* A memfd mapped twice (MAP_SHARED): the first mapping is for registration
 * (MINOR faults, CONTINUE), the alias populates the page cache behind it. */
uint64_t uf_mmap_shared_pair(uint64_t len, uint64_t *alias_out)
{
	int fd = memfd_create("uffdio-shm", MFD_CLOEXEC);
	void *a, *b;

	if (fd < 0 || ftruncate(fd, (off_t)len) < 0)
		goto fail;
	a = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (a == MAP_FAILED)
		goto fail;
	b = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (b == MAP_FAILED) {
		munmap(a, len);
		goto fail;
	}
	close(fd);
	*alias_out = (uint64_t)(uintptr_t)b;
	return (uint64_t)(uintptr_t)a;
fail:
	if (fd >= 0)
		close(fd);
	return 0;
}

uint64_t uf_mremap(uint64_t old, uint64_t oldlen, uint64_t newlen)
{
	void *p = mremap((void *)(uintptr_t)old, oldlen, newlen, MREMAP_MAYMOVE);

	return p == MAP_FAILED ? 0 : (uint64_t)(uintptr_t)p;
}

int uf_madvise(uint64_t addr, uint64_t len, int advice)
{
	return madvise((void *)(uintptr_t)addr, len, advice) < 0 ? -errno : 0;
}

int uf_munmap(uint64_t addr, uint64_t len)
{
	return munmap((void *)(uintptr_t)addr, len) < 0 ? -errno : 0;
}

/*
 * swapbench - the target of `uffdio bench swap`: one thread, a big anonymous buffer,
 * a fill phase and a timed access phase, every page it reads checked against what it
 * must contain.  The same binary runs under a memory cgroup with kernel swap, under
 * `uffdio run --limit`, and with no limit, so its own cost is the same in all three.
 *
 * usage: swapbench MiB WORKLOAD ACCESSES [SEED]
 *   WORKLOAD: seq   sequential passes over the buffer (reads)
 *             rand  uniformly random pages (reads)
 *             zipf  skewed (s = 0.99, rank scattered over the buffer) (reads)
 *             mixed 70% reads / 30% writes on a zipf hot set whose position shifts 8
 *                   times during the run
 * Page content: word 0 = page index, word 1 = version, the other words a function of
 * both: one in SWAPBENCH_SPARSE (default 2) pseudo-random, the others constant (LZ4:
 * about 1.5x with 2, 5x with 8).
 * Every access reads (and checks) or rewrites the whole page.
 *
 * With SWAPBENCH_PAUSE set, prints "filled" after the fill phase and waits for a line on
 * stdin before the access phase (uffdio bench evict evicts the buffer meanwhile).
 *
 * Prints one JSON line: {"fill_s", "work_s", "accesses", "pages_checked", "minflt",
 * "majflt", "maxrss_kb"} and exits 0; on a mismatch prints it and exits 1.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint64_t mix(uint64_t x)
{
	x ^= x >> 31;
	x *= 0x7fb5d329728ea185ULL;
	x ^= x >> 27;
	x *= 0x81dadef4bc2dd44dULL;
	x ^= x >> 33;
	return x;
}

/* one word in `sparse` is pseudo-random, the others constant: 2 (the default) gives
 * pages LZ4 compresses about 1.5x, 8 about 5x (SWAPBENCH_SPARSE) */
static int sparse = 2;

static void fill(uint64_t *p, uint64_t idx, uint64_t ver)
{
	uint64_t s = mix(idx * 1000003 + ver), c = idx ^ (ver << 40);

	p[0] = idx;
	p[1] = ver;
	for (int i = 2; i < WORDS; i += sparse) {
		s = s * 6364136223846793005ULL + 1442695040888963407ULL;
		p[i] = s;
		for (int j = 1; j < sparse && i + j < WORDS; j++)
			p[i + j] = c;
	}
}

static int check(const uint64_t *p, uint64_t idx, uint64_t ver)
{
	uint64_t s = mix(idx * 1000003 + ver), c = idx ^ (ver << 40), bad = 0;

	bad |= p[0] ^ idx;
	bad |= p[1] ^ ver;
	for (int i = 2; i < WORDS; i += sparse) {
		s = s * 6364136223846793005ULL + 1442695040888963407ULL;
		bad |= p[i] ^ s;
		for (int j = 1; j < sparse && i + j < WORDS; j++)
			bad |= p[i + j] ^ c;
	}
	return bad == 0;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 88172645463325252ULL;
static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

/* zipf(s) ranks 0..n-1 by inverse CDF over a table of 1024 quantiles (+ linear
 * interpolation inside), then scattered over the buffer by a multiplicative hash so that
 * hot pages are not neighbours. */
static double *zq;
static size_t zn;
static void zipf_init(size_t n, double s)
{
	double h = 0, acc = 0;
	size_t k, q = 0;

	zn = n;
	zq = malloc(1025 * sizeof(double));
	for (k = 1; k <= n; k++)
		h += 1.0 / pow((double)k, s);
	for (k = 1; k <= n && q <= 1024; k++) {
		acc += 1.0 / pow((double)k, s) / h;
		while (q <= 1024 && acc >= q / 1024.0)
			zq[q++] = (double)(k - 1);
	}
	while (q <= 1024)
		zq[q++] = (double)(n - 1);
}

static size_t zipf_rank(void)
{
	double u = (rnd() >> 11) * (1.0 / 9007199254740992.0) * 1024.0;
	size_t q = (size_t)u;
	double f = u - q, r = zq[q] + f * (zq[q + 1] - zq[q]);
	size_t k = (size_t)r;
	return k < zn ? k : zn - 1;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: swapbench MiB seq|rand|zipf|mixed ACCESSES [SEED]\n");
		return 2;
	}
	size_t npages = (size_t)strtoull(argv[1], NULL, 0) * 256;
	const char *w = argv[2];
	long accesses = atol(argv[3]);
	if (argc > 4)
		rng = mix(strtoull(argv[4], NULL, 0)) | 1;
	if (getenv("SWAPBENCH_SPARSE")) {
		sparse = atoi(getenv("SWAPBENCH_SPARSE"));
		if (sparse != 1 && sparse != 2 && sparse != 4 && sparse != 8 && sparse != 16) {
			fprintf(stderr, "swapbench: SWAPBENCH_SPARSE must be 1, 2, 4, 8 or 16\n");
			return 2;
		}
	}
	int kind = !strcmp(w, "seq") ? 0 : !strcmp(w, "rand") ? 1 : !strcmp(w, "zipf") ? 2 : !strcmp(w, "mixed") ? 3 : -1;
	if (kind < 0 || npages == 0 || accesses < 0) {
		fprintf(stderr, "swapbench: bad arguments\n");
		return 2;
	}
	uint8_t *buf = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint8_t *ver = calloc(npages, 1);
	if (buf == MAP_FAILED || !ver) {
		perror("swapbench: mmap");
		return 2;
	}
	madvise(buf, npages * PAGE, MADV_NOHUGEPAGE);
	if (kind >= 2)
		zipf_init(npages, 0.99);

	double t0 = now();
	for (size_t i = 0; i < npages; i++)
		fill((uint64_t *)(buf + i * PAGE), i, 0);
	double t1 = now();
	if (getenv("SWAPBENCH_PAUSE")) { /* bench evict: the manager evicts everything now */
		char line[16];
		printf("filled\n");
		fflush(stdout);
		if (!fgets(line, sizeof(line), stdin))
			return 2;
		t1 = now();
	}

	uint64_t checked = 0;
	size_t shift = 0, seg = accesses / 8 + 1;
	for (long a = 0; a < accesses; a++) {
		size_t i;
		int wr = 0;

		switch (kind) {
		case 0:
			i = (size_t)a % npages;
			break;
		case 1:
			i = rnd() % npages;
			break;
		case 2:
			i = (zipf_rank() * 0x9E3779B97F4A7C15ULL) % npages;
			break;
		default:
			if ((size_t)a % seg == 0)
				shift = rnd() % npages;
			i = (zipf_rank() * 0x9E3779B97F4A7C15ULL + shift) % npages;
			wr = rnd() % 10 < 3;
			break;
		}
		uint64_t *p = (uint64_t *)(buf + i * PAGE);
		if (!check(p, i, ver[i])) {
			printf("{\"error\": \"page %zu version %u: mismatch (word0=%llu word1=%llu)\"}\n", i,
			       ver[i], (unsigned long long)p[0], (unsigned long long)p[1]);
			fflush(stdout);
			return 1;
		}
		checked++;
		if (wr) {
			ver[i]++;
			fill(p, i, ver[i]);
		}
	}
	double t2 = now();

	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	printf("{\"fill_s\": %.6f, \"work_s\": %.6f, \"accesses\": %ld, \"pages_checked\": %llu, "
	       "\"minflt\": %ld, \"majflt\": %ld, \"maxrss_kb\": %ld}\n",
	       t1 - t0, t2 - t1, accesses, (unsigned long long)checked, ru.ru_minflt, ru.ru_majflt,
	       ru.ru_maxrss);
	return 0;
}

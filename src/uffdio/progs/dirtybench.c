/*
 * dirtybench - what it costs to learn which pages a program wrote, two ways, on this
 * kernel, side by side (uffdio bench dirty builds and runs it).
 *
 *   wp     write-protect faults: the range is registered with UFFDIO_REGISTER_MODE_WP
 *          and write-protected; the first write to a page stops the writing thread
 *          until a handler thread (here the role of uffdio's engine) reads the fault
 *          message, notes the page and removes the protection (which wakes the writer).
 *          The dirty set is known as the writes happen; re-arming costs one
 *          UFFDIO_WRITEPROTECT per run of dirty pages.
 *   async  UFFD_FEATURE_WP_ASYNC: the kernel resolves those write faults itself (no
 *          message, no wake-up) and marks the page written; the dirty set is read with
 *          one PAGEMAP_SCAN ioctl (PM_SCAN_WP_MATCHING) that also write-protects the
 *          written pages again.  The scan walks every page of the range, written or not.
 *   bare   the same writes without any tracking (the floor).
 *
 * Every round: a fresh range of `mib` MiB, filled (resident), then one write to each of
 * `fraction` of its pages (in address order for seq, in a random order for rand), then
 * the dirty set is collected and re-armed.  Each mode's collected set must be exactly the
 * pages written (exit 1 otherwise).  Rounds alternate the order of the modes.
 *
 * Usage: dirtybench MIB FRACTION ROUNDS seq|rand
 * Prints one JSON object per run, one per line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL

#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef PAGEMAP_SCAN
struct page_region {
	uint64_t start, end, categories;
};
struct pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted,
		category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN 0xC0606610UL
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WRITTEN (1 << 1)
#endif

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
	fprintf(stderr, "dirtybench: %s: %s\n", what, strerror(errno));
	exit(2);
}

struct handler {
	int uffd, stop;
	char *base;
	uint8_t *dirty; /* one byte per page: the handler saw its write fault */
	uint64_t faults;
};

static void *handle(void *arg)
{
	struct handler *h = arg;
	struct uffd_msg msgs[64];

	for (;;) {
		struct pollfd p[2] = { { h->uffd, POLLIN, 0 }, { h->stop, POLLIN, 0 } };
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (p[1].revents)
			return NULL;
		ssize_t n = read(h->uffd, msgs, sizeof(msgs));
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			die("read uffd");
		}
		for (ssize_t i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++) {
			struct uffd_msg *m = &msgs[i];
			if (m->event != UFFD_EVENT_PAGEFAULT || !(m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP))
				continue;
			uint64_t a = m->arg.pagefault.address & ~(PG - 1);
			h->dirty[(a - (uint64_t)(uintptr_t)h->base) / PG] = 1;
			h->faults++;
			struct uffdio_writeprotect wp = { { a, PG }, 0 }; /* unprotect, and wake */
			while (ioctl(h->uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
				if (errno != EAGAIN)
					die("UFFDIO_WRITEPROTECT (resolve)");
		}
	}
}

static int open_uffd(uint64_t features)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	struct uffdio_api api = { .api = UFFD_API, .features = features };

	if (fd < 0)
		die("userfaultfd");
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		die("UFFDIO_API (WP_ASYNC needs Linux 6.7)");
	return fd;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: dirtybench MIB FRACTION ROUNDS seq|rand\n");
		return 2;
	}
	uint64_t npages = (uint64_t)atol(argv[1]) * 256;
	double fraction = atof(argv[2]);
	int rounds = atoi(argv[3]), rnd = !strcmp(argv[4], "rand");
	if (!npages || fraction <= 0 || fraction > 1 || rounds < 1 || (!rnd && strcmp(argv[4], "seq"))) {
		fprintf(stderr, "dirtybench: bad arguments\n");
		return 2;
	}
	uint64_t k = (uint64_t)(fraction * (double)npages), len = npages * PG, i;
	if (k == 0)
		k = 1;
	/* the pages to write: evenly spread, visited in address order or shuffled */
	uint64_t *order = malloc(k * sizeof(*order));
	uint8_t *want = calloc(npages, 1), *seen = calloc(npages, 1);
	struct page_region *vec = malloc(npages * sizeof(*vec));
	if (!order || !want || !seen || !vec)
		die("malloc");
	for (i = 0; i < k; i++) {
		order[i] = i * npages / k;
		want[order[i]] = 1;
	}
	if (rnd) {
		uint64_t s = 88172645463325252ULL;
		for (i = k - 1; i > 0; i--) {
			s ^= s << 13, s ^= s >> 7, s ^= s << 17;
			uint64_t j = s % (i + 1), t = order[i];
			order[i] = order[j];
			order[j] = t;
		}
	}
	const char *modes[3] = { "bare", "wp", "async" };
	for (int r = 0; r < rounds; r++) {
		for (int mi = 0; mi < 3; mi++) {
			int mode = r % 2 ? 2 - mi : mi; /* alternate the order */
			char *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (base == MAP_FAILED)
				die("mmap");
			madvise(base, len, MADV_NOHUGEPAGE);
			for (i = 0; i < npages; i++)
				memset(base + i * PG, (int)(i & 0xff) | 1, PG);
			int uffd = -1;
			pthread_t th;
			struct handler h = { -1, -1, base, seen, 0 };
			double t_arm = 0, t_write, t_collect = 0, t_rearm = 0, t_scan_clean = 0, t0;
			uint64_t found = 0;
			memset(seen, 0, npages);
			if (mode) {
				uffd = open_uffd(mode == 2 ? UFFD_FEATURE_WP_ASYNC : 0);
				struct uffdio_register reg = { { (uint64_t)(uintptr_t)base, len }, UFFDIO_REGISTER_MODE_WP, 0 };
				if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
					die("UFFDIO_REGISTER (WP)");
				t0 = now();
				struct uffdio_writeprotect wp = { { (uint64_t)(uintptr_t)base, len }, UFFDIO_WRITEPROTECT_MODE_WP };
				if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
					die("UFFDIO_WRITEPROTECT");
				t_arm = now() - t0;
				if (mode == 1) {
					h.uffd = uffd;
					h.stop = eventfd(0, EFD_CLOEXEC);
					if (pthread_create(&th, NULL, handle, &h))
						die("pthread_create");
				}
			}
			t0 = now();
			for (i = 0; i < k; i++)
				((volatile uint64_t *)(base + order[i] * PG))[1] = i + 1;
			t_write = now() - t0;
			if (mode == 1) {
				uint64_t one = 1;
				if (write(h.stop, &one, sizeof(one)) != sizeof(one))
					die("eventfd");
				pthread_join(th, NULL);
				close(h.stop);
				/* re-arm: protect the dirty pages again, one call per run */
				t0 = now();
				for (i = 0; i < npages; i++) {
					if (!seen[i])
						continue;
					uint64_t j = i;
					while (j < npages && seen[j])
						j++;
					struct uffdio_writeprotect wp = { { (uint64_t)(uintptr_t)(base + i * PG), (j - i) * PG },
									  UFFDIO_WRITEPROTECT_MODE_WP };
					if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
						die("UFFDIO_WRITEPROTECT (re-arm)");
					found += j - i;
					i = j;
				}
				t_rearm = now() - t0;
			} else if (mode == 2) {
				int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
				if (pm < 0)
					die("open pagemap");
				for (int pass = 0; pass < 2; pass++) {
					struct pm_scan_arg a = { .size = sizeof(a),
								 .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
								 .start = (uint64_t)(uintptr_t)base,
								 .end = (uint64_t)(uintptr_t)base + len,
								 .vec = (uint64_t)(uintptr_t)vec,
								 .vec_len = npages,
								 .category_mask = PAGE_IS_WRITTEN,
								 .return_mask = PAGE_IS_WRITTEN };
					t0 = now();
					long n = ioctl(pm, PAGEMAP_SCAN, &a);
					double dt = now() - t0;
					if (n < 0)
						die("PAGEMAP_SCAN");
					if (pass == 0) { /* the written pages, protected again */
						t_collect = dt;
						for (long j = 0; j < n; j++)
							for (uint64_t a2 = vec[j].start; a2 < vec[j].end; a2 += PG) {
								seen[(a2 - (uint64_t)(uintptr_t)base) / PG] = 1;
								found++;
							}
					} else { /* nothing written since: what a scan of clean pages costs */
						t_scan_clean = dt;
						if (n != 0) {
							fprintf(stderr, "dirtybench: a second scan found %ld written runs\n", n);
							return 1;
						}
					}
				}
				close(pm);
			}
			if (mode && (found != k || memcmp(seen, want, npages))) {
				fprintf(stderr, "dirtybench: %s found %llu dirty pages, %llu were written\n", modes[mode],
					(unsigned long long)found, (unsigned long long)k);
				return 1;
			}
			for (i = 0; i < k; i++) /* the writes landed */
				if (((uint64_t *)(base + order[i] * PG))[1] != i + 1) {
					fprintf(stderr, "dirtybench: a write was lost\n");
					return 1;
				}
			printf("{\"mode\": \"%s\", \"round\": %d, \"pages\": %llu, \"written\": %llu, \"arm_s\": %.6f, "
			       "\"write_s\": %.6f, \"collect_s\": %.6f, \"rearm_s\": %.6f, \"scan_clean_s\": %.6f, "
			       "\"faults_handled\": %llu}\n",
			       modes[mode], r, (unsigned long long)npages, (unsigned long long)k, t_arm, t_write, t_collect,
			       t_rearm, t_scan_clean, (unsigned long long)h.faults);
			fflush(stdout);
			if (uffd >= 0)
				close(uffd);
			munmap(base, len);
		}
	}
	return 0;
}

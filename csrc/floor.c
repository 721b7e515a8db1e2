/*
 * floor.c - the simplest correct fault handler: a thread doing poll(), read()
 * and UFFDIO_COPY, no busy waiting, no io_uring.  It is the baseline that
 * `uffdio bench faults` compares the engine against.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/eventfd.h>

#include "compat.h"
#include "uffdio.h"

struct uf_floor {
	int uffd, stop_fd, cpu;
	uint64_t src;
	int64_t served;
	pthread_t thr;
};

static void *floor_thread(void *arg)
{
	struct uf_floor *f = arg;
	struct uf_msg msgs[64];

	if (f->cpu >= 0)
		uf_set_cpu(f->cpu);
	for (;;) {
		struct pollfd p[2] = { { .fd = f->uffd, .events = POLLIN }, { .fd = f->stop_fd, .events = POLLIN } };
		int64_t n, i;

		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[1].revents)
			break;
		n = uf_read_msgs(f->uffd, msgs, 64);
		if (n == -EAGAIN)
			continue;
		if (n < 0)
			break;
		for (i = 0; i < n; i++) {
			uint64_t done;
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
				continue;
			if (uf_copy_all(f->uffd, msgs[i].b & ~4095ULL, f->src, 4096, 0, &done) == 0)
				f->served++;
		}
	}
	return NULL;
}

uf_floor *uf_floor_start(int uffd, uint64_t src_page, int cpu, int *err)
{
	struct uf_floor *f = calloc(1, sizeof(*f));

	*err = 0;
	if (!f) {
		*err = -ENOMEM;
		return NULL;
	}
	f->uffd = uffd;
	f->src = src_page;
	f->cpu = cpu;
	f->stop_fd = eventfd(0, EFD_CLOEXEC);
	if (f->stop_fd < 0 || (*err = -pthread_create(&f->thr, NULL, floor_thread, f))) {
		if (!*err)
			*err = -errno;
		if (f->stop_fd >= 0)
			close(f->stop_fd);
		free(f);
		return NULL;
	}
	return f;
}

int64_t uf_floor_stop(uf_floor *f)
{
	uint64_t one = 1;
	int64_t served;

	if (write(f->stop_fd, &one, sizeof(one)) < 0)
		return -errno;
	pthread_join(f->thr, NULL);
	close(f->stop_fd);
	served = f->served;
	free(f);
	return served;
}

/*
 * ops.c - one function per kernel operation.  No policy: each call does what
 * its name says and returns 0 / a count, or -errno.  The Python layer maps
 * the errno to an exception in one place (uffdio/_errors.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#include "compat.h"
#include "uffdio.h"

#define UF_PAGE 4096ULL

_Static_assert(sizeof(struct uf_msg) == sizeof(struct uffd_msg), "uf_msg must mirror uffd_msg");
_Static_assert(sizeof(struct iovec) == 2 * sizeof(uint64_t), "(start,len) pairs must be iovecs");
_Static_assert(sizeof(struct page_region) == 3 * sizeof(uint64_t), "page_region triples");

static int neg_errno(void) { return errno ? -errno : -EIO; }

int uf_open(int flags, int *via_devnode)
{
	int oflags = O_CLOEXEC | ((flags & UF_OPEN_BLOCKING) ? 0 : O_NONBLOCK);
	int sysflags = oflags | ((flags & UF_OPEN_USER_MODE_ONLY) ? UFFD_USER_MODE_ONLY : 0);
	int fd, sys_err = -ENOSYS, dev, r;

	if (via_devnode)
		*via_devnode = 0;
	if (!(flags & UF_OPEN_DEVNODE_ONLY)) {
		fd = (int)syscall(__NR_userfaultfd, sysflags);
		if (fd >= 0)
			return fd;
		sys_err = neg_errno();
		if (flags & UF_OPEN_SYSCALL_ONLY)
			return sys_err;
	}
	/* /dev/userfaultfd (6.1+): access is controlled by the file mode, and
	 * it grants kernel-mode fault handling without vm.unprivileged_userfaultfd. */
	dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return (flags & UF_OPEN_DEVNODE_ONLY) ? neg_errno() : sys_err;
	r = ioctl(dev, USERFAULTFD_IOC_NEW, sysflags);
	if (r < 0) {
		r = neg_errno();
		close(dev);
		return (flags & UF_OPEN_DEVNODE_ONLY) ? r : sys_err;
	}
	close(dev);
	if (via_devnode)
		*via_devnode = 1;
	return r;
}

int uf_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };

	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return neg_errno();
	if (features_out)
		*features_out = api.features;
	if (ioctls_out)
		*ioctls_out = api.ioctls;
	return 0;
}

/* UFFDIO_API may be called only once per uffd: probe on a throw-away fd. */
int uf_probe(int flags, uint64_t *features_out, uint64_t *ioctls_out)
{
	int fd = uf_open(flags, NULL), r;

	if (fd < 0)
		return fd;
	r = uf_api(fd, 0, features_out, ioctls_out);
	close(fd);
	return r;
}

int uf_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
	struct uffdio_register reg = { .range = { .start = start, .len = len }, .mode = mode };

	if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
		return neg_errno();
	if (ioctls_out)
		*ioctls_out = reg.ioctls;
	return 0;
}

int uf_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range r = { .start = start, .len = len };

	return ioctl(fd, UFFDIO_UNREGISTER, &r) < 0 ? neg_errno() : 0;
}

int uf_wake(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range r = { .start = start, .len = len };

	return ioctl(fd, UFFDIO_WAKE, &r) < 0 ? neg_errno() : 0;
}

/* Whether the process a uffd belongs to still has its memory: 1 yes, 0 no (it exited
 * or exec'd: its mm is gone), or -errno.  The probe is a UFFDIO_COPY whose source page
 * cannot be read (PROT_NONE in our own memory).  The kernel looks the mm up first
 * (-ESRCH when it is gone) and only then the destination: no registered range there
 * gives -ENOENT; a registered one fails on the source (-EFAULT) before anything is
 * installed, and nothing is woken (DONTWAKE).  So the target is never touched, wherever
 * the destination falls.  Measured on
 * 6.18: alive -ENOENT / -EFAULT, exited -ESRCH. */
int uf_mm_alive(int fd)
{
	static void *unreadable; /* one page for the process's life */
	void *p = __atomic_load_n(&unreadable, __ATOMIC_ACQUIRE);
	struct uffdio_copy c;
	int r;

	if (!p) {
		void *q = mmap(NULL, UF_PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), *none = NULL;
		if (q == MAP_FAILED)
			return neg_errno();
		if (!__atomic_compare_exchange_n(&unreadable, &none, q, 0, __ATOMIC_ACQ_REL,
						 __ATOMIC_ACQUIRE)) {
			munmap(q, UF_PAGE); /* another thread made one first */
			q = none;
		}
		p = q;
	}
	memset(&c, 0, sizeof(c));
	c.dst = 1ULL << 30;
	c.src = (uint64_t)(uintptr_t)p;
	c.len = UF_PAGE;
	c.mode = UFFDIO_COPY_MODE_DONTWAKE;
	if (ioctl(fd, UFFDIO_COPY, &c) == 0)
		return 1; /* cannot happen (the source is unreadable); alive all the same */
	r = neg_errno();
	if (r == -ESRCH)
		return 0;
	/* anything else (-EINVAL: a file mapping registered there, say) proves the mm was
	 * found; only a bad fd is an error */
	return r == -EBADF || r == -ENOTTY ? r : 1;
}

/* For the fill ioctls the kernel writes bytes done (> 0) or -errno into the
 * output field, and returns -EAGAIN for a partial operation.  Always read it. */
int uf_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *copied)
{
	struct uffdio_copy c = { .dst = dst, .src = src, .len = len, .mode = mode };
	int r = ioctl(fd, UFFDIO_COPY, &c) < 0 ? neg_errno() : 0;

	if (copied)
		*copied = c.copy;
	return r;
}

int uf_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *zeroed)
{
	struct uffdio_zeropage z = { .range = { .start = start, .len = len }, .mode = mode };
	int r = ioctl(fd, UFFDIO_ZEROPAGE, &z) < 0 ? neg_errno() : 0;

	if (zeroed)
		*zeroed = z.zeropage;
	return r;
}

int uf_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *mapped)
{
	struct uffdio_continue c = { .range = { .start = start, .len = len }, .mode = mode };
	int r = ioctl(fd, UFFDIO_CONTINUE, &c) < 0 ? neg_errno() : 0;

	if (mapped)
		*mapped = c.mapped;
	return r;
}

int uf_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *moved)
{
	struct uffdio_move m = { .dst = dst, .src = src, .len = len, .mode = mode };
	int r = ioctl(fd, UFFDIO_MOVE, &m) < 0 ? neg_errno() : 0;

	if (moved)
		*moved = m.move;
	return r;
}

int uf_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *updated)
{
	struct uffdio_poison p = { .range = { .start = start, .len = len }, .mode = mode };
	int r = ioctl(fd, UFFDIO_POISON, &p) < 0 ? neg_errno() : 0;

	if (updated)
		*updated = p.updated;
	return r;
}

int uf_writeprotect(int fd, const uint64_t *ranges, size_t nranges, uint64_t mode, size_t *done)
{
	size_t i;

	for (i = 0; i < nranges; i++) {
		struct uffdio_writeprotect wp = {
			.range = { .start = ranges[2 * i], .len = ranges[2 * i + 1] }, .mode = mode };
		if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0) {
			int r = neg_errno();
			if (done)
				*done = i;
			return r;
		}
	}
	if (done)
		*done = nranges;
	return 0;
}

int64_t uf_read_msgs(int fd, struct uf_msg *out, size_t max)
{
	ssize_t n = read(fd, out, max * sizeof(*out));

	if (n < 0)
		return neg_errno();
	return n / (ssize_t)sizeof(*out);
}

/* Finish a fill across partial progress and already-mapped pages.  An
 * EEXIST page is someone else's resolution (another fault message for the
 * same page, or a racing handler): it counts as done and is woken, because a
 * thread may have queued its fault before the page appeared. */
typedef int (*fill_fn)(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *out);

static int zp_adapter(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *out)
{
	(void)src;
	return uf_zeropage(fd, dst, len, mode, out);
}

static int fill_all(fill_fn fn, int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
		    uint64_t dontwake, uint64_t *done, uint64_t *eexist)
{
	uint64_t off = 0;

	while (off < len) {
		int64_t got = 0;
		int r = fn(fd, dst + off, src + off, len - off, mode, &got);

		if (r == 0) {
			off = len;
			break;
		}
		if (got > 0) {            /* partial: keep going */
			off += (uint64_t)got;
			continue;
		}
		if (r == -EEXIST) {
			if (!(mode & dontwake))
				uf_wake(fd, dst + off, UF_PAGE);
			if (eexist)
				(*eexist)++;
			off += UF_PAGE;
			continue;
		}
		if (r == -ENOENT)
			/* The mapping changed under us (munmap, mremap): munmap does not wake
			 * threads waiting on the range, so wake them here; they retry the access
			 * against the new mapping (and get SIGSEGV/EFAULT if it is gone). */
			uf_wake(fd, dst + off, len - off);
		if (done)
			*done = off;
		return r;
	}
	if (done)
		*done = len;
	return 0;
}

/* The engine's variants also count pages that were already mapped. */
int uf_copy_all_counted(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
			uint64_t *done, uint64_t *eexist)
{
	return fill_all(uf_copy, fd, dst, src, len, mode, UFFDIO_COPY_MODE_DONTWAKE, done, eexist);
}

int uf_zeropage_all_counted(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *done,
			    uint64_t *eexist)
{
	return fill_all(zp_adapter, fd, start, 0, len, mode, UFFDIO_ZEROPAGE_MODE_DONTWAKE, done,
			eexist);
}

int uf_copy_all(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, uint64_t *done)
{
	return uf_copy_all_counted(fd, dst, src, len, mode, done, NULL);
}

int uf_zeropage_all(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *done)
{
	return uf_zeropage_all_counted(fd, start, len, mode, done, NULL);
}

/* ---- other processes ---------------------------------------------------------- */

typedef ssize_t (*pvm_fn)(pid_t, const struct iovec *, unsigned long, const struct iovec *,
			  unsigned long, unsigned long);

static int64_t pvm(pvm_fn fn, int pid, const uint64_t *local, size_t nlocal, const uint64_t *remote,
		   size_t nremote)
{
	/* The kernel takes at most IOV_MAX iovecs per side.  Larger batches are
	 * split; that needs the two sides paired one to one. */
	int64_t total = 0;
	size_t i = 0;

	if (nlocal <= IOV_MAX && nremote <= IOV_MAX) {
		ssize_t n = fn(pid, (const struct iovec *)local, nlocal, (const struct iovec *)remote,
			       nremote, 0);
		return n < 0 ? neg_errno() : n;
	}
	if (nlocal != nremote)
		return -E2BIG;
	while (i < nlocal) {
		size_t k = nlocal - i > IOV_MAX ? IOV_MAX : nlocal - i, j;
		uint64_t want = 0;
		ssize_t n;

		for (j = 0; j < k; j++)
			want += local[2 * (i + j) + 1];
		n = fn(pid, (const struct iovec *)(local + 2 * i), k, (const struct iovec *)(remote + 2 * i),
		       k, 0);
		if (n < 0)
			return total ? total : neg_errno();
		total += n;
		if ((uint64_t)n < want)
			break; /* partial: the caller sees the short count */
		i += k;
	}
	return total;
}

int64_t uf_process_vm_readv(int pid, const uint64_t *local, size_t nlocal, const uint64_t *remote, size_t nremote)
{
	return pvm(process_vm_readv, pid, local, nlocal, remote, nremote);
}

int64_t uf_process_vm_writev(int pid, const uint64_t *local, size_t nlocal, const uint64_t *remote, size_t nremote)
{
	return pvm((pvm_fn)process_vm_writev, pid, local, nlocal, remote, nremote);
}

int64_t uf_process_madvise(int pidfd, const uint64_t *ranges, size_t nranges, int advice)
{
	int64_t total = 0;
	size_t i = 0;

	while (i < nranges) {
		size_t k = nranges - i > IOV_MAX ? IOV_MAX : nranges - i;
		long n = syscall(__NR_process_madvise, pidfd, (const struct iovec *)(ranges + 2 * i), k,
				 advice, 0);
		if (n < 0)
			return total ? total : neg_errno();
		total += n;
		i += k;
	}
	return total;
}

int uf_pidfd_open(int pid, unsigned int flags)
{
	long r = syscall(__NR_pidfd_open, pid, flags);

	return r < 0 ? neg_errno() : (int)r;
}

int uf_pidfd_getfd(int pidfd, int targetfd)
{
	long r = syscall(__NR_pidfd_getfd, pidfd, targetfd, 0);

	return r < 0 ? neg_errno() : (int)r;
}

int uf_send_fd(int sock, int fd, const void *data, size_t len)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	char dummy = 0;
	struct iovec iov = { .iov_base = len ? (void *)data : &dummy, .iov_len = len ? len : 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c;

	memset(cbuf, 0, sizeof(cbuf));
	c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	return sendmsg(sock, &mh, MSG_NOSIGNAL) < 0 ? neg_errno() : 0;
}

int uf_recv_fd(int sock, int *fd_out, void *data, size_t len)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	char dummy;
	struct iovec iov = { .iov_base = len ? data : &dummy, .iov_len = len ? len : 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c;
	ssize_t n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);

	*fd_out = -1;
	if (n < 0)
		return neg_errno();
	for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
			memcpy(fd_out, CMSG_DATA(c), sizeof(int));
	if (*fd_out < 0)
		return n == 0 ? -ECONNRESET : -EBADMSG;
	return (int)n;
}

int64_t uf_pagemap_scan(int pagemap_fd, struct uf_scan *s, uint64_t *regions_out, size_t max_regions)
{
	struct pm_scan_arg a = {
		.size = sizeof(a), .flags = s->flags, .start = s->start, .end = s->end,
		.vec = (uint64_t)(uintptr_t)regions_out, .vec_len = max_regions, .max_pages = s->max_pages,
		.category_inverted = s->category_inverted, .category_mask = s->category_mask,
		.category_anyof_mask = s->category_anyof_mask, .return_mask = s->return_mask,
	};
	long r = ioctl(pagemap_fd, PAGEMAP_SCAN, &a);

	s->walk_end = a.walk_end;
	return r < 0 ? neg_errno() : r;
}

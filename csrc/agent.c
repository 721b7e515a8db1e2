/*
 * agent.c - the uffdio agent: the part of uffdio that runs inside a managed
 * process (LD_PRELOAD=libuffdio_agent.so, or linked and started explicitly).
 *
 * Why an agent at all: only the process that owns an mm may create its
 * userfaultfd without ptrace, register ranges transparently for kernel-mode
 * accesses, and UFFDIO_MOVE its pages (MOVE is same-mm only).  The agent does
 * exactly those things, on the manager's request, and nothing else: policy,
 * fault handling and page data stay in the manager.
 *
 * What it does:
 *  - creates the uffd (EVENT_FORK when permitted, REMAP, REMOVE, UNMAP, MOVE),
 *    sends it to the manager with SCM_RIGHTS and keeps its own duplicate: if
 *    the manager dies, the uffd context survives, faulting threads wait
 *    instead of reading zeros, and the agent reconnects to a restarted manager;
 *  - registers private anonymous writable mappings (MISSING mode) found in
 *    /proc/self/maps, on the manager's SCAN request and right after an
 *    interposed mmap();
 *  - zaps pages for eviction with UFFDIO_MOVE into a registered scratch area
 *    rather than MADV_DONTNEED: a move raises no REMOVE event, so the manager
 *    never confuses its own zaps with the application's madvise() (whose
 *    REMOVE events mean "the saved copy is void, read zeros"); a page that is
 *    COW-shared (after fork) or pinned is refused by the kernel (EBUSY) and
 *    stays resident, which is right because zapping it would free nothing;
 *  - handles fork(): with EVENT_FORK the kernel registers the child with a new
 *    uffd that the manager gets; the child's agent reconnects and the manager
 *    sends it that uffd to keep.  Without EVENT_FORK (no CAP_SYS_PTRACE) the
 *    parent asks the manager to bring every evicted page back before fork()
 *    and not to evict until fork() returns (a fence), so the child, whose
 *    copies of the ranges are unregistered, never sees a zapped page.
 *
 * The agent thread must never block on a managed page (if the manager is
 * dead, nobody would resolve it): it runs on its own stack inside one mmap'd
 * agent region that is never registered, keeps its buffers there, and calls
 * only thin system-call wrappers.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "compat.h"
#include "agent_proto.h"
#include "uffdio_agent.h"

#define EXPORT __attribute__((visibility("default")))
#define PAGE 4096UL
/* two halves: the pages of an eviction batch in flight, the previous batch being emptied */
#define SCRATCH_DEFAULT (16UL << 20)
#define STACK_SIZE (256UL << 10)
#define MAXLOCKED 256
#define MSGBYTES (sizeof(struct uf_agent_hdr) + UF_AGENT_MAXWORDS * 8)
#define MAPSBUF (64UL << 10)
/* the manager's store and table, and those of fork children not yet given theirs (four
 * each: see the manager's _keep_orphan) */
#define MAXKEPT 64
#define MAXDATA 512
#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif

struct agent {
	int uffd;       /* our own duplicate; -1 until we have one */
	int sock;
	pid_t pid;
	int event_fork, user_mode, ready, detached, lockall, thread_running;
	/* a fork child (EVENT_FORK) under userspace swap until the manager handed it its page
	 * table: the table is the only record of which of its pages were evicted */
	int table_wanted;
	/* the last handshake's answer: 1 welcomed, -1 refused (calling again would get the
	 * same answer), 2 "call again" (-EAGAIN), 0 none (the connection broke first) */
	int welcome;
	int64_t uffd_err;
	uint64_t features;
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	uint64_t scratch, scratch_len;
	uint64_t zap_start, zap_len; /* a deferred zap of scratch that failed: retried */
	uint64_t region, region_len; /* this struct, buffers and the thread's stack */
	/* send_msg holds no lock (see there): sends in flight, and a dropped connection's
	 * descriptor that is closed once none is */
	int senders, old_sock;
	pthread_mutex_t move_lock; /* a MOVE request vs. mlock() noting a range */
	pthread_mutex_t fence_lock;
	pthread_cond_t fence_cv;
	uint64_t seq, fence_seq, fence_done_seq;
	int64_t fence_rc;
	pthread_t thr;
	uint64_t locked[MAXLOCKED][2];
	size_t nlocked;
	uint64_t data[MAXDATA][2]; /* writable segments (.data/.bss) of loaded objects */
	size_t ndata;
	int relaxed;               /* walk_maps for DETACH: every anonymous mapping */
	int64_t kept_tag[MAXKEPT];
	int kept_fd[MAXKEPT];
	int nkept;
	uint64_t *rx, *tx; /* message buffers (header + payload) */
	char *maps;        /* /proc/self/maps read buffer */
	char *stack;
};

/* The only agent state outside the agent region.  Initialised data (not .bss)
 * so that it lives in the file-backed data mapping of this library, which is
 * never registered. */
static struct agent *A __attribute__((section(".data"))) = NULL;
static pid_t (*real_fork)(void) __attribute__((section(".data"))) = NULL;

/* ---- small system-call helpers (no libc state touched beyond errno) ------------------ */

static void nap_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static void *raw_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	long r = syscall(SYS_mmap, addr, len, prot, flags, fd, off);
	if (r < 0 && r > -4096) {
		errno = (int)-r;
		return MAP_FAILED;
	}
	return (void *)r;
}

static int uffd_register(int fd, uint64_t start, uint64_t len)
{
	/* MISSING for eviction, WP so that pages brought back unmodified can be evicted
	 * again without a copy (the manager write-protects them and learns of the first
	 * write); kernels without anonymous WP get MISSING alone */
	struct uffdio_register r = { .range = { start, len },
				     .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP };
	static int wp = -1;
	if (wp < 0) { /* the manager asks for WP when it tracks clean pages (userspace swap) */
		const char *w = getenv("UFFDIO_AGENT_WP");
		wp = w && *w == '1';
	}
	if (wp && ioctl(fd, UFFDIO_REGISTER, &r) == 0)
		return 0;
	r.mode = UFFDIO_REGISTER_MODE_MISSING;
	return ioctl(fd, UFFDIO_REGISTER, &r) < 0 ? -errno : 0;
}

static int uffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range r = { start, len };
	return ioctl(fd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

/* Open and configure a uffd.  Transparent management needs kernel-mode faults
 * (a read() into an evicted buffer must wait, not fail with EFAULT), so a
 * user-mode-only uffd is refused here rather than used. */
static int open_uffd(int *event_fork, uint64_t *features)
{
	const uint64_t base = UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |
			      UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_THREAD_ID;
	uint64_t want[4] = { base | UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_MOVE,
			     base | UFFD_FEATURE_MOVE, base | UFFD_FEATURE_EVENT_FORK, base };
	int i, err = -ENOSYS;
	/* UFFDIO_AGENT_NO_EVENT_FORK=1: do not let the kernel follow fork (children then
	 * get the fork fence); for programs that fork huge numbers of short-lived children */
	const char *nf = getenv("UFFDIO_AGENT_NO_EVENT_FORK");
	int skip_fork = nf && *nf == '1';

	for (i = 0; i < 4; i++) {
		if (skip_fork && (want[i] & UFFD_FEATURE_EVENT_FORK))
			continue;
		int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
		if (fd < 0) {
			int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
			err = -errno;
			if (dev >= 0) {
				fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
				close(dev);
			}
			if (fd < 0)
				return err == -ENOENT ? -EPERM : err;
		}
		struct uffdio_api api = { .api = UFFD_API, .features = want[i] };
		if (ioctl(fd, UFFDIO_API, &api) == 0) {
			/* .features reports all the kernel offers; in force is what we asked */
			*event_fork = !!(want[i] & UFFD_FEATURE_EVENT_FORK);
			*features = want[i];
			return fd;
		}
		err = -errno;
		close(fd); /* UFFDIO_API may be tried once per uffd: start over */
	}
	return err;
}

/* ---- messages ------------------------------------------------------------------------ */

static int send_on(int s, uint32_t type, uint32_t flags, uint64_t seq, int64_t a, int64_t b,
		   int64_t c, const uint64_t *words, uint64_t n, int fd)
{
	struct uf_agent_hdr h = { type, flags, seq, a, b, c, n };
	struct iovec iov[2] = { { &h, sizeof(h) }, { (void *)words, n * 8 } };
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = n ? 2 : 1 };

	if (fd >= 0) {
		struct cmsghdr *cm;
		memset(cbuf, 0, sizeof(cbuf));
		mh.msg_control = cbuf;
		mh.msg_controllen = sizeof(cbuf);
		cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	}
	return s < 0 ? -ENOTCONN : (sendmsg(s, &mh, MSG_NOSIGNAL) < 0 ? -errno : 0);
}

/* Send on the manager's connection, from any thread.  No lock is held while the kernel
 * copies the message from the caller's memory: a program thread's stack page can be
 * missing (a MOVE took it a moment ago) and the copy then waits on the fault - which
 * waits for the batch, which waits for this agent's answer to the MOVE.  Had the sender
 * held a lock the agent thread needs to answer, nothing would move again.
 * SOCK_SEQPACKET keeps concurrent messages whole; the count keeps a dropped connection's
 * descriptor from being closed (and its number reused by another file) under a sender
 * that read it (drop_sock).  A connection is published only once its handshake is done,
 * so nothing else reaches a manager before HELLO. */
static int send_msg(uint32_t type, uint32_t flags, uint64_t seq, int64_t a, int64_t b, int64_t c,
		    const uint64_t *words, uint64_t n, int fd)
{
	int rc;

	__atomic_add_fetch(&A->senders, 1, __ATOMIC_SEQ_CST);
	rc = send_on(__atomic_load_n(&A->sock, __ATOMIC_SEQ_CST), type, flags, seq, a, b, c, words, n, fd);
	__atomic_sub_fetch(&A->senders, 1, __ATOMIC_SEQ_CST);
	return rc;
}

/* Receive one message into A->rx; returns payload words or -errno (0 words is fine);
 * -ECONNRESET on EOF. */
static int64_t recv_msg(int s, struct uf_agent_hdr **h, int *fd_out)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { A->rx, MSGBYTES };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm;
	ssize_t n;

	*fd_out = -1;
	do
		n = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	if (n == 0)
		return -ECONNRESET;
	for (cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
		if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS)
			memcpy(fd_out, CMSG_DATA(cm), sizeof(int));
	if ((size_t)n < sizeof(struct uf_agent_hdr))
		return -EBADMSG;
	*h = (struct uf_agent_hdr *)A->rx;
	if ((*h)->n > UF_AGENT_MAXWORDS || sizeof(struct uf_agent_hdr) + (*h)->n * 8 > (size_t)n)
		return -EBADMSG;
	return (int64_t)(*h)->n;
}

static int connect_manager(void)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

	if (s < 0)
		return -errno;
	memcpy(sa.sun_path, A->path, sizeof(sa.sun_path));
	if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int e = -errno;
		close(s);
		return e;
	}
	return s;
}

/* HELLO, then wait for WELCOME (which may arrive only after the manager has set
 * up serving).  GIVE_UFFD may come first for a forked child. */
static int handshake(int s, uint32_t flags)
{
	uint64_t w[6] = { UF_AGENT_VERSION, A->scratch, A->scratch_len, A->region, A->region_len,
			  (uint64_t)A->nkept };
	struct uf_agent_hdr *h;
	int64_t n;
	int fd, rc, i;

	if (A->uffd >= 0)
		flags |= UF_AF_HAS_UFFD;
	if (A->event_fork)
		flags |= UF_AF_EVENT_FORK;
	if ((flags & UF_AF_RECONNECT) && A->table_wanted)
		flags |= UF_AF_TABLE_LOST;
	A->welcome = 0;
	rc = send_on(s, UF_A_HELLO, flags, 0, A->pid, getppid(),
		     A->uffd_err ? A->uffd_err : (int64_t)A->features, w, 6, A->uffd);
	if (rc < 0)
		return rc;
	for (i = 0; i < A->nkept; i++) /* the previous manager's store, for its successor */
		if ((rc = send_on(s, UF_A_KEPT, 0, 0, A->kept_tag[i], 0, 0, NULL, 0, A->kept_fd[i])) < 0)
			return rc;
	for (;;) {
		n = recv_msg(s, &h, &fd);
		if (n < 0)
			return (int)n;
		if (h->type == UF_M_GIVE_UFFD && fd >= 0) {
			if (A->uffd >= 0)
				close(A->uffd);
			A->uffd = fd;
			continue;
		}
		if (fd >= 0)
			close(fd);
		if (h->type == UF_M_WELCOME) {
			A->welcome = h->a >= 0 ? 1 : h->a == -EAGAIN ? 2 : -1;
			return h->a < 0 ? (int)h->a : 0;
		}
	}
}

/* Empty a range of our scratch area.  Not a plain MADV_DONTNEED: on a registered range
 * that raises a REMOVE event, and the kernel holds the caller until the manager has read
 * it - were the manager killed meanwhile, this thread (the one that must call its
 * successor) would wait forever.  The range is unregistered for the zap and registered
 * again (no event either way; the scratch area is registered only so that MOVE may put
 * pages there). */
static int zap_scratch(uint64_t start, uint64_t len)
{
	struct uffdio_range r = { start, len };
	int rc = 0;

	if (A->uffd >= 0 && ioctl(A->uffd, UFFDIO_UNREGISTER, &r) < 0)
		return -errno;
	if (madvise((void *)start, len, MADV_DONTNEED) < 0)
		rc = -errno;
	if (A->uffd >= 0) {
		int r2 = uffd_register(A->uffd, start, len);
		if (r2 < 0 && !rc)
			rc = r2;
	}
	return rc;
}

/* ---- mappings -------------------------------------------------------------------------- */

static int overlaps(uint64_t s, uint64_t e, uint64_t s2, uint64_t len2)
{
	return len2 && s < s2 + len2 && s2 < e;
}

/* Is this /proc/self/maps entry memory the manager may take charge of?  Only
 * private, writable, anonymous memory (the heap included): file pages have a
 * backing store already, shared memory cannot be zapped by one process, and a
 * read-only or PROT_NONE area has nothing to evict.  Skipped on purpose:
 * [stack] (hot, grows down: the growth would not be registered anyway), the
 * agent's own region and scratch, and mlock()ed ranges (the program asked for
 * them to stay resident; pinned I/O buffers usually are).  The .bss of every
 * loaded object is cut out by the caller (see note_data). */
static int manageable(uint64_t s, uint64_t e, const char *perms, unsigned long inode, const char *name)
{
	size_t i;

	if (perms[0] != 'r' || perms[1] != 'w' || perms[3] != 'p' || inode != 0)
		return 0;
	if (name[0] && strcmp(name, "[heap]") != 0 && strncmp(name, "[anon:", 6) != 0)
		return 0;
	if (A->relaxed)
		return 1;
	for (i = 0; i < A->nlocked; i++)
		if (overlaps(s, e, A->locked[i][0], A->locked[i][1]))
			return 0;
	return 1;
}

/* The writable segments of every loaded object, from the program headers.  Their
 * anonymous part (.bss) holds libc's and the loader's globals, which the agent
 * thread reads (a mutex's elision flag, the loader's state): were such a page
 * being evicted, the agent would wait on a fault that only its own reply can
 * end.  They are small; they stay unmanaged. */
static int data_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
	int i;

	(void)size;
	(void)arg;
	for (i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_W) || A->ndata >= MAXDATA)
			continue;
		uint64_t st = (info->dlpi_addr + ph->p_vaddr) & ~(PAGE - 1);
		uint64_t en = (info->dlpi_addr + ph->p_vaddr + ph->p_memsz + PAGE - 1) & ~(PAGE - 1);
		A->data[A->ndata][0] = st;
		A->data[A->ndata][1] = en - st;
		A->ndata++;
	}
	return 0;
}

/* Called by a program thread (session_start), never by the agent thread:
 * dl_iterate_phdr reads the calling thread's DTV and the loader's link maps, which
 * live in the managed heap - an agent thread waiting on such a page waits for a
 * manager that may have died with its fault unread, and no successor can reach it
 * (it is the thread that would reconnect).  Objects loaded later (dlopen) are not
 * read by the agent thread; their .bss is managed like any anonymous memory. */
static void note_data(void)
{
	A->ndata = 0;
	dl_iterate_phdr(data_cb, NULL);
}

/* Call fn on the parts of [s, e) outside the agent's own memory and every loaded
 * object's writable segment.  Pieces, not whole mappings: the kernel merges
 * adjacent anonymous mappings, so one /proc/self/maps line can hold both. */
static void each_piece(uint64_t s, uint64_t e, void (*fn)(uint64_t s, uint64_t e, void *arg), void *arg)
{
	size_t i, n = A->relaxed ? 0 : A->ndata;

	for (i = 0; i < n + 2 && s < e; i++) {
		uint64_t ds, de;
		if (i < n) {
			ds = A->data[i][0];
			de = ds + A->data[i][1];
		} else if (i == n) {
			ds = A->region;
			de = ds + A->region_len;
		} else {
			ds = A->scratch;
			de = ds + A->scratch_len;
		}
		if (de <= s || ds >= e)
			continue;
		if (ds > s)
			each_piece(s, ds, fn, arg); /* the part before, checked against the rest */
		s = de;
	}
	if (s < e)
		fn(s, e, arg);
}

static uint64_t hexnum(const char **p)
{
	uint64_t v = 0;
	for (;; (*p)++) {
		char c = **p;
		if (c >= '0' && c <= '9')
			v = v * 16 + (uint64_t)(c - '0');
		else if (c >= 'a' && c <= 'f')
			v = v * 16 + (uint64_t)(c - 'a' + 10);
		else
			return v;
	}
}

/* One maps line: "start-end perms offset dev inode   name" */
static int parse_line(const char *l, uint64_t *s, uint64_t *e, char perms[5], unsigned long *inode,
		      const char **name)
{
	const char *p = l;
	int f;

	*s = hexnum(&p);
	if (*p++ != '-')
		return -1;
	*e = hexnum(&p);
	if (*p++ != ' ')
		return -1;
	memcpy(perms, p, 4);
	perms[4] = 0;
	p += 4;
	for (f = 0; f < 2; f++) { /* skip offset and dev */
		while (*p == ' ')
			p++;
		while (*p && *p != ' ')
			p++;
	}
	while (*p == ' ')
		p++;
	*inode = 0;
	while (*p >= '0' && *p <= '9')
		*inode = *inode * 10 + (unsigned long)(*p++ - '0');
	while (*p == ' ')
		p++;
	*name = p;
	return 0;
}

/* Walk /proc/self/maps; for each manageable mapping call fn.  Streams the file
 * through a fixed buffer (no malloc: see the header comment). */
static int walk_maps(void (*fn)(uint64_t s, uint64_t e, void *arg), void *arg)
{
	int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
	size_t have = 0;

	if (fd < 0)
		return -errno;
	for (;;) {
		ssize_t n = read(fd, A->maps + have, MAPSBUF - 1 - have);
		char *line, *nl;
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		have += (size_t)n;
		A->maps[have] = 0;
		line = A->maps;
		while ((nl = strchr(line, '\n'))) {
			uint64_t s, e;
			char perms[5];
			unsigned long inode;
			const char *name;
			*nl = 0;
			if (parse_line(line, &s, &e, perms, &inode, &name) == 0 &&
			    manageable(s, e, perms, inode, name))
				each_piece(s, e, fn, arg);
			line = nl + 1;
		}
		have = (size_t)(A->maps + have - line);
		memmove(A->maps, line, have);
	}
	close(fd);
	return 0;
}

struct scan_out {
	uint64_t *w;
	uint64_t n, max;
	int64_t busy;
};

static void register_one(uint64_t s, uint64_t e, void *arg)
{
	struct scan_out *o = arg;
	int rc = uffd_register(A->uffd, s, e - s);

	if (rc == -EBUSY) { /* the program uses userfaultfd on it itself: leave it alone */
		o->busy++;
		return;
	}
	if (rc < 0)
		return;
	if (o->n >= 2 && o->w[o->n - 2] + o->w[o->n - 1] == s) {
		o->w[o->n - 1] += e - s;
	} else if (o->n + 2 <= o->max) {
		o->w[o->n++] = s;
		o->w[o->n++] = e - s;
	}
}

static void unregister_one(uint64_t s, uint64_t e, void *arg)
{
	(void)arg;
	uffd_unregister(A->uffd, s, e - s);
}

/* ---- requests ------------------------------------------------------------------------ */

/* Move one run to the scratch area.  Appends the (src, len) pieces that moved.
 * Pages the kernel refuses (EBUSY: shared or pinned; ENOENT/EINVAL: the mapping
 * changed) are skipped one at a time and stay where they are. */
static int is_locked(uint64_t s, uint64_t len)
{
	size_t i;

	if (A->lockall)
		return 1;
	for (i = 0; i < A->nlocked; i++)
		if (overlaps(s, s + len, A->locked[i][0], A->locked[i][1]))
			return 1;
	return 0;
}

static void move_run(uint64_t src, uint64_t dst, uint64_t len, uint64_t *out, uint64_t *nout,
		     uint64_t max, int64_t *skipped)
{
	uint64_t off = 0;
	int tries = 0;

	/* The manager's list of regions may be a moment old: the program may have
	 * unmapped the range and mapped something new there (glibc does, inside
	 * malloc), which nobody registered yet.  A page moved out of an unregistered
	 * mapping would read as zeros, so make sure the source is registered with
	 * our uffd (a no-op when it is; EBUSY when it belongs to another uffd) and
	 * skip it otherwise.  mlock()ed ranges stay put. */
	if (is_locked(src, len) || uffd_register(A->uffd, src, len) < 0) {
		*skipped += (int64_t)(len / PAGE);
		return;
	}

	while (off < len) {
		if (*nout + 2 > max) {
			/* no room to say what moves next: nothing more moves (a page moved
			 * without the manager knowing would be dropped) */
			*skipped += (int64_t)((len - off) / PAGE);
			return;
		}
		struct uffdio_move m = { .dst = dst + off, .src = src + off, .len = len - off,
					 .mode = UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES };
		int rc = ioctl(A->uffd, UFFDIO_MOVE, &m) < 0 ? -errno : 0;
		uint64_t moved = m.move > 0 ? (uint64_t)m.move : 0;
		if (rc == 0)
			moved = len - off;
		if (moved) {
			if (*nout >= 2 && out[*nout - 2] + out[*nout - 1] == src + off) {
				out[*nout - 1] += moved;
			} else if (*nout + 2 <= max) {
				out[*nout] = src + off;
				out[*nout + 1] = moved;
				*nout += 2;
			}
			off += moved;
			tries = 0;
		}
		if (rc == 0)
			break;
		/* EAGAIN without progress: an event of the program is pending.  The manager
		 * reads no event while it waits for this MOVE (so that no mapping can change
		 * under it): retrying long is futile - the rest stays resident, and the
		 * event is read as soon as we answer. */
		if (rc == -EAGAIN && (moved || tries++ < 3)) {
			if (!moved)
				sched_yield();
			continue;
		}
		if (rc == -EAGAIN) {
			*skipped += (int64_t)((len - off) / PAGE);
			return;
		}
		if (off < len) { /* refused: this page stays resident */
			off += PAGE;
			(*skipped)++;
		}
	}
}

static void do_request(struct uf_agent_hdr *h, int fd)
{
	uint64_t *w = (uint64_t *)(h + 1), *out = A->tx, nout = 0, i;
	int64_t rc = 0, aux = 0;
	int zap_after = 0;

	switch (h->type) {
	case UF_M_SCAN: {
		struct scan_out o = { out, 0, UF_AGENT_MAXWORDS, 0 };
		if (A->uffd < 0) {
			rc = -EBADF;
			break;
		}
		if (!A->lockall)
			rc = walk_maps(register_one, &o);
		nout = o.n;
		aux = o.busy;
		break;
	}
	case UF_M_MOVE:
		if (A->uffd < 0 || !(A->features & UFFD_FEATURE_MOVE)) {
			rc = A->uffd < 0 ? -EBADF : -EOPNOTSUPP;
			break;
		}
		/* a range left over from an earlier request whose zap failed goes first:
		 * the moves below may need it empty */
		if (A->zap_len && zap_scratch(A->zap_start, A->zap_len) == 0)
			A->zap_len = 0;
		if (h->c > 0) {
			uint64_t zs = (uint64_t)h->b, zl = (uint64_t)h->c;
			if (zs < A->scratch || zl > A->scratch_len || zs - A->scratch > A->scratch_len - zl ||
			    (zs | zl) & (PAGE - 1)) {
				rc = -EINVAL; /* only ever our own scratch area */
				break;
			}
			zap_after = 1;
		}
		for (i = 0; i + 3 <= h->n; i += 3) {
			if (!overlaps(w[i + 1], w[i + 1] + w[i + 2], A->scratch, A->scratch_len) ||
			    w[i + 1] + w[i + 2] > A->scratch + A->scratch_len) {
				rc = -EINVAL; /* only ever into our own scratch area */
				break;
			}
			pthread_mutex_lock(&A->move_lock);
			move_run(w[i], w[i + 1], w[i + 2], out, &nout, UF_AGENT_MAXWORDS, &aux);
			pthread_mutex_unlock(&A->move_lock);
		}
		break;
	case UF_M_DONTNEED:
		for (i = 0; i + 2 <= h->n; i += 2) {
			if (w[i] < A->scratch || w[i] + w[i + 1] > A->scratch + A->scratch_len) {
				rc = -EINVAL; /* the application's memory is never zapped this way */
				break;
			}
			int z = zap_scratch(w[i], w[i + 1]);
			if (z < 0)
				rc = z;
		}
		break;
	case UF_M_GIVE_UFFD:
		if (fd >= 0) {
			if (A->uffd >= 0)
				close(A->uffd);
			A->uffd = fd;
			fd = -1;
		}
		break;
	case UF_M_PING:
		break;
	case UF_M_KEEP_FD: {
		int k;
		for (k = 0; k < A->nkept && A->kept_tag[k] != h->a; k++)
			;
		if (k < A->nkept) {
			close(A->kept_fd[k]);
			A->kept_fd[k] = A->kept_fd[A->nkept - 1];
			A->kept_tag[k] = A->kept_tag[A->nkept - 1];
			A->nkept--;
		}
		if (fd >= 0) {
			if (A->nkept == MAXKEPT) {
				rc = -ENOSPC;
				break;
			}
			A->kept_tag[A->nkept] = h->a;
			A->kept_fd[A->nkept++] = fd;
			fd = -1;
			if (h->a == UF_KEEP_SWAP_TABLE)
				A->table_wanted = 0;
		}
		break;
	}
	case UF_M_FENCE_ACK:
		pthread_mutex_lock(&A->fence_lock);
		if (h->seq > A->fence_done_seq)
			A->fence_done_seq = h->seq;
		A->fence_rc = h->a;
		pthread_cond_broadcast(&A->fence_cv);
		pthread_mutex_unlock(&A->fence_lock);
		return; /* no reply */
	case UF_M_DETACH:
		if (A->uffd >= 0) {
			/* everything, even what the rules above would no longer pick: whatever
			 * we registered earlier (another uffd's ranges refuse with EINVAL) */
			A->relaxed = 1;
			walk_maps(unregister_one, NULL);
			A->relaxed = 0;
			uffd_unregister(A->uffd, A->scratch, A->scratch_len);
		}
		A->detached = 1;
		while (A->nkept > 0)
			close(A->kept_fd[--A->nkept]);
		break;
	default:
		rc = -EOPNOTSUPP;
	}
	if (fd >= 0)
		close(fd);
	send_msg(UF_A_REPLY, 0, h->seq, rc, aux, 0, out, nout, -1);
	/* The previous batch's scratch pages are read by now (the manager asked for the
	 * zap): empty them while the manager works on this batch.  Requests are handled
	 * one at a time, so the next MOVE into that range waits for this.  When it fails
	 * the range is tried again before the next MOVE. */
	if (zap_after && zap_scratch((uint64_t)h->b, (uint64_t)h->c) < 0) {
		A->zap_start = (uint64_t)h->b;
		A->zap_len = (uint64_t)h->c;
	}
}

/* The agent thread: end the connection (the manager sees it end now) and close its
 * descriptor once no send_msg is in flight - one that read it before the exchange is
 * counted in senders (sequentially consistent: it counts itself before it reads).  One
 * left open is closed at the next drop or connect; a second one meanwhile is leaked -
 * at most one per manager that served us while a sender stayed stuck on a fault (a
 * connection whose handshake fails is never published, and is closed at once). */
static void drop_sock(void)
{
	int s = __atomic_exchange_n(&A->sock, -1, __ATOMIC_SEQ_CST);

	if (s >= 0)
		shutdown(s, SHUT_RDWR);
	if (__atomic_load_n(&A->senders, __ATOMIC_SEQ_CST) == 0) {
		if (A->old_sock >= 0)
			close(A->old_sock);
		A->old_sock = -1;
		if (s >= 0)
			close(s);
	} else if (s >= 0) {
		A->old_sock = s;
	}
}

static void *agent_main(void *arg)
{
	(void)arg;
	/* who we are, so that our faults (the loader reads this thread's TLS vector and
	 * link maps, which live in the managed heap) are never held at the memory limit */
	send_msg(UF_A_THREAD, 0, 0, (int64_t)syscall(SYS_gettid), 0, 0, NULL, 0, -1);
	for (;;) {
		struct uf_agent_hdr *h;
		int fd;
		int64_t n = recv_msg(A->sock, &h, &fd);
		if (n >= 0) {
			do_request(h, fd);
			if (!A->detached)
				continue;
		}
		/* detached, or the manager went away */
		drop_sock();
		if (A->detached) {
			if (A->uffd >= 0)
				close(A->uffd);
			A->uffd = -1;
			A->ready = 0;
			pthread_mutex_lock(&A->fence_lock);
			A->thread_running = 0;
			pthread_cond_broadcast(&A->fence_cv);
			pthread_mutex_unlock(&A->fence_lock);
			return NULL;
		}
		/* Keep the uffd (our duplicate holds the registrations: threads that fault
		 * now wait) and reconnect until a manager takes over again. */
		for (;;) {
			int s = connect_manager();
			if (s >= 0) {
				if (handshake(s, UF_AF_RECONNECT) == 0) {
					drop_sock(); /* (only an old descriptor left open, if any) */
					__atomic_store_n(&A->sock, s, __ATOMIC_SEQ_CST);
					/* the new manager must know us too: our faults are never
					 * held at its limit (it needs us to make room) */
					send_msg(UF_A_THREAD, 0, 0, (int64_t)syscall(SYS_gettid), 0, 0, NULL, 0, -1);
					break;
				}
				close(s); /* (never published: no other thread has it) */
			}
			nap_ms(100);
		}
	}
}

/* ---- setup ------------------------------------------------------------------------------ */

static int alloc_region(void)
{
	size_t hdr = (sizeof(struct agent) + PAGE - 1) & ~(PAGE - 1);
	size_t msg = (MSGBYTES + PAGE - 1) & ~(PAGE - 1);
	size_t total = hdr + 2 * msg + MAPSBUF + STACK_SIZE;
	char *r = raw_mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	const char *env;

	if (r == MAP_FAILED)
		return -errno;
	A = (struct agent *)r;
	memset(A, 0, sizeof(*A));
	/* a name of its own keeps the kernel from merging it with the program's mappings
	 * (and shows it in /proc/PID/maps); without CONFIG_ANON_VMA_NAME it is skipped */
	prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, (unsigned long)r, total, "uffdio-agent");
	A->region = (uint64_t)(uintptr_t)r;
	A->region_len = total;
	A->rx = (uint64_t *)(r + hdr);
	A->tx = (uint64_t *)(r + hdr + msg);
	A->maps = r + hdr + 2 * msg;
	A->stack = r + hdr + 2 * msg + MAPSBUF;
	A->uffd = A->sock = A->old_sock = -1;
	A->scratch_len = SCRATCH_DEFAULT;
	if ((env = getenv("UFFDIO_AGENT_SCRATCH")) && atol(env) > 0)
		A->scratch_len = ((uint64_t)atol(env) + PAGE - 1) & ~(PAGE - 1);
	return 0;
}

static void init_locks(void)
{
	pthread_mutex_init(&A->move_lock, NULL);
	pthread_mutex_init(&A->fence_lock, NULL);
	pthread_cond_init(&A->fence_cv, NULL);
}

static int start_thread(void)
{
	pthread_attr_t at;
	sigset_t all, old;
	int rc;

	pthread_attr_init(&at);
	pthread_attr_setstack(&at, A->stack, STACK_SIZE);
	pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
	/* the program's signals are for the program's threads */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = pthread_create(&A->thr, &at, agent_main, NULL);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&at);
	if (rc == 0)
		A->thread_running = 1;
	return -rc;
}

/* Create (or, for an EVENT_FORK child, wait to be given) the uffd, connect, register. */
static int session_start(uint32_t flags)
{
	int s, rc;

	A->pid = getpid();
	note_data();
	if (A->uffd < 0 && !(flags & UF_AF_FORKED && A->event_fork)) {
		int fd = open_uffd(&A->event_fork, &A->features);
		if (fd < 0)
			A->uffd_err = fd;
		else
			A->uffd = fd;
	}
	if (A->uffd >= 0 && !(flags & UF_AF_FORKED && A->event_fork)) {
		rc = uffd_register(A->uffd, A->scratch, A->scratch_len);
		if (rc < 0)
			return rc;
	}
	s = connect_manager();
	if (s < 0)
		return s;
	rc = handshake(s, flags);
	if (rc < 0 || A->uffd_err) {
		close(s);
		return rc < 0 ? rc : (int)A->uffd_err;
	}
	__atomic_store_n(&A->sock, s, __ATOMIC_SEQ_CST);
	A->ready = 1;
	return start_thread();
}

EXPORT int uffdio_agent_start(const char *sock_path)
{
	int rc;

	if (!sock_path || strlen(sock_path) >= sizeof(A->path))
		return -EINVAL;
	if (A && A->ready)
		return -EALREADY;
	if (!A && (rc = alloc_region()) < 0)
		return rc;
	init_locks();
	memcpy(A->path, sock_path, strlen(sock_path) + 1);
	if (!real_fork)
		real_fork = (pid_t(*)(void))dlsym(RTLD_NEXT, "fork");
	if (!A->scratch) {
		void *sc = raw_mmap(NULL, A->scratch_len, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (sc == MAP_FAILED)
			return -errno;
		madvise(sc, A->scratch_len, MADV_NOHUGEPAGE);
		prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, (unsigned long)sc, A->scratch_len,
		      "uffdio-scratch");
		A->scratch = (uint64_t)(uintptr_t)sc;
	}
	return session_start(0);
}

EXPORT int uffdio_agent_stop(void)
{
	int rc;

	if (!A || !A->ready)
		return -ENOTCONN;
	/* Unregistering here would turn every evicted page into zeros: the manager
	 * brings them back first, then sends DETACH, which the agent thread carries
	 * out.  Wait for that (with no manager, this waits for the next one). */
	rc = send_msg(UF_A_RELEASE, 0, 0, 0, 0, 0, NULL, 0, -1);
	if (rc < 0 && rc != -ENOTCONN && rc != -EPIPE)
		return rc;
	pthread_mutex_lock(&A->fence_lock);
	while (A->thread_running) {
		if (rc < 0) { /* between managers: ask again once one is there */
			pthread_mutex_unlock(&A->fence_lock);
			nap_ms(100);
			rc = send_msg(UF_A_RELEASE, 0, 0, 0, 0, 0, NULL, 0, -1);
			pthread_mutex_lock(&A->fence_lock);
			continue;
		}
		pthread_cond_wait(&A->fence_cv, &A->fence_lock);
	}
	pthread_mutex_unlock(&A->fence_lock);
	return 0;
}

__attribute__((constructor)) static void agent_ctor(void)
{
	const char *p = getenv(UF_AGENT_ENV_SOCK);
	int rc;

	if (!p || !*p)
		return;
	rc = uffdio_agent_start(p);
	if (rc < 0 && getenv("UFFDIO_AGENT_VERBOSE")) {
		char msg[160];
		int n = snprintf(msg, sizeof(msg), "uffdio agent (pid %d): not managed: %s\n",
				 (int)getpid(), strerror(-rc));
		if (n > 0 && write(2, msg, (size_t)n) < 0) {
		}
	}
}

/* ---- interposed calls ------------------------------------------------------------------- */

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	void *p = raw_mmap(addr, len, prot, flags, fd, off);

	/* Register a new private anonymous writable mapping right away; anything
	 * else (and everything glibc maps internally) is found by the next scan. */
	if (p != MAP_FAILED && A && A->ready && A->uffd >= 0 && !A->lockall &&
	    (flags & (MAP_PRIVATE | MAP_ANONYMOUS)) == (MAP_PRIVATE | MAP_ANONYMOUS) &&
	    !(flags & (MAP_LOCKED | MAP_SHARED)) && (prot & PROT_WRITE))
		uffd_register(A->uffd, (uint64_t)(uintptr_t)p, (len + PAGE - 1) & ~(PAGE - 1));
	return p;
}
EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
	__attribute__((alias("mmap")));

/* An mlock()ed range is never evicted again.  It stays registered: unregistering
 * would turn pages that are evicted right now into zeros; the mlock() that follows
 * faults them back in through the manager.  The move lock orders this against a
 * MOVE in progress, which finishes before the range is noted. */
static void note_locked(const void *addr, size_t len)
{
	uint64_t s = (uint64_t)(uintptr_t)addr & ~(PAGE - 1);
	uint64_t e = ((uint64_t)(uintptr_t)addr + len + PAGE - 1) & ~(PAGE - 1);

	if (!A)
		return;
	pthread_mutex_lock(&A->move_lock);
	if (A->nlocked < MAXLOCKED) {
		A->locked[A->nlocked][0] = s;
		A->locked[A->nlocked][1] = e - s;
		A->nlocked++;
	} else {
		A->lockall = 1; /* out of room: stop evicting from this process at all */
	}
	pthread_mutex_unlock(&A->move_lock);
}

EXPORT int mlock(const void *addr, size_t len)
{
	note_locked(addr, len);
	return (int)syscall(SYS_mlock, addr, len);
}

EXPORT int mlock2(const void *addr, size_t len, unsigned int flags)
{
	note_locked(addr, len);
	return (int)syscall(SYS_mlock2, addr, len, flags);
}

EXPORT int mlockall(int flags)
{
	if (A) {
		pthread_mutex_lock(&A->move_lock);
		A->lockall = 1;
		pthread_mutex_unlock(&A->move_lock);
	}
	return (int)syscall(SYS_mlockall, flags);
}

/* Ask the manager for a fork fence (see the header comment) and wait for it. */
static int64_t ask_manager(uint32_t type, int64_t a, int64_t b)
{
	uint64_t seq;
	int64_t rc;

	pthread_mutex_lock(&A->fence_lock);
	seq = ++A->fence_seq;
	pthread_mutex_unlock(&A->fence_lock);
	rc = send_msg(type, 0, seq, a, b, 0, NULL, 0, -1);
	if (rc < 0)
		return rc;
	pthread_mutex_lock(&A->fence_lock);
	while (A->fence_done_seq < seq)
		pthread_cond_wait(&A->fence_cv, &A->fence_lock);
	rc = A->fence_rc;
	pthread_mutex_unlock(&A->fence_lock);
	return rc;
}

static int64_t fence(void)
{
	return ask_manager(UF_A_FENCE, 0, 0);
}

/* The program registers a range with a userfaultfd of its own.  The kernel allows
 * one uffd per range, so ours yields: the manager brings back the range's
 * evicted pages and forgets them, we unregister it and never move from it again,
 * and the program's registration then succeeds as if we were not there. */
EXPORT int ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, req);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (req == UFFDIO_REGISTER && A && A->ready && fd != A->uffd && A->uffd >= 0 && arg) {
		struct uffdio_register *r = arg;
		uint64_t s = r->range.start & ~(PAGE - 1);
		uint64_t e = (r->range.start + r->range.len + PAGE - 1) & ~(PAGE - 1);
		note_locked((void *)(uintptr_t)s, e - s);
		if (A->sock >= 0 && ask_manager(UF_A_YIELD, (int64_t)s, (int64_t)(e - s)) == 0)
			uffd_unregister(A->uffd, s, e - s);
	}
	return (int)syscall(SYS_ioctl, fd, req, arg);
}

struct probe {
	int fd, busy;
};

static void probe_one(uint64_t s, uint64_t e, void *arg)
{
	struct probe *p = arg;
	struct uffdio_register r = { .range = { s, PAGE }, .mode = UFFDIO_REGISTER_MODE_MISSING };

	if (!p->busy && ioctl(p->fd, UFFDIO_REGISTER, &r) < 0 && errno == EBUSY)
		p->busy = 1;
}

/* Whether our memory is still registered with a uffd (a fork child's, kept by some
 * agent for the next manager): a uffd of our own cannot register a page of it then
 * (EBUSY).  The scratch area first, then the first page of each range the agent would
 * register (the scratch area may have been unregistered for a zap at the fork).
 * Nothing here touches memory the manager may have evicted (no getenv, no malloc).
 * When we cannot tell, we say no: run on, as before anything was kept. */
static int still_registered(void)
{
	struct uffdio_api api = { .api = UFFD_API };
	int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	struct probe p = { -1, 0 };

	if (fd < 0) {
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev < 0)
			return 0;
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		close(dev);
		if (fd < 0)
			return 0;
	}
	p.fd = fd;
	if (ioctl(fd, UFFDIO_API, &api) == 0) {
		probe_one(A->scratch, A->scratch + PAGE, &p);
		if (!p.busy)
			walk_maps(probe_one, &p);
	}
	close(fd); /* (unregisters what it registered) */
	return p.busy;
}

/* A fork child (EVENT_FORK) whose manager went away before it welcomed us: killed
 * while it paired us with our uffd, maybe.  Our memory is registered with the uffd of
 * the fork event, which an agent up our fork chain keeps for the next manager (the
 * manager's _keep_orphan), and nobody serves it meanwhile: any page we touch may wait.
 * So we wait here, in fork(), before anything else runs - creating the agent thread
 * itself reads the loader's data in the heap, whose pages may be evicted - and call
 * until a manager takes us over (or says it cannot). */
static int call_again_forked(void)
{
	int broken = 0;

	for (;;) {
		int s, rc;

		if (!still_registered())
			return -ENOTCONN; /* nobody keeps our uffd: nothing waits, we run as before */
		nap_ms(100);
		s = connect_manager();
		if (s < 0)
			continue;
		rc = handshake(s, UF_AF_FORKED | UF_AF_RECONNECT);
		if (rc == 0) {
			__atomic_store_n(&A->sock, s, __ATOMIC_SEQ_CST);
			A->ready = 1;
			return start_thread();
		}
		close(s);
		if (A->welcome < 0)
			return rc;
		/* a manager that takes our hello and drops us, again and again, without an
		 * answer (a bug of its): give up after a while, and run on as before */
		if (A->welcome == 0 && ++broken > 50)
			return rc;
	}
}

EXPORT pid_t fork(void)
{
	int managed = A && A->ready && A->sock >= 0;
	int fenced = 0;
	pid_t pid;

	if (!real_fork)
		real_fork = (pid_t(*)(void))dlsym(RTLD_NEXT, "fork");
	if (managed && !A->event_fork)
		fenced = fence() == 0;
	pid = real_fork();
	if (pid < 0) {
		if (fenced)
			send_msg(UF_A_FENCE_END, 0, 0, 0, 0, 0, NULL, 0, -1);
		return pid;
	}
	if (pid > 0) {
		if (managed)
			send_msg(fenced ? UF_A_FENCE_END : UF_A_FORKED, 0, 0, pid, 0, 0, NULL, 0, -1);
		return pid;
	}
	/* the child: the agent thread did not survive fork(); locks may be held by it */
	if (A && A->ready) {
		int ef = A->event_fork;
		init_locks();
		A->ready = A->thread_running = 0;
		if (A->sock >= 0)
			close(A->sock); /* the parent's connection: the manager must see it end with the parent */
		A->sock = -1;
		if (A->old_sock >= 0)
			close(A->old_sock);
		A->old_sock = -1;
		A->senders = 0; /* (the senders were other threads) */
		if (A->uffd >= 0)
			close(A->uffd); /* the parent's context */
		A->uffd = -1;
		A->uffd_err = 0;
		A->fence_seq = A->fence_done_seq = 0;
		/* the parent's store and table: the child gets its own (with EVENT_FORK the
		 * manager holds a copy of the parent's swap table for it, until then the only
		 * record of the pages it has evicted) */
		A->table_wanted = 0;
		for (int k = 0; k < A->nkept; k++)
			if (A->kept_tag[k] == UF_KEEP_SWAP_TABLE && ef)
				A->table_wanted = 1;
		while (A->nkept > 0)
			close(A->kept_fd[--A->nkept]);
		/* With EVENT_FORK our ranges (scratch included) are registered with the
		 * child's new uffd, which the manager holds and gives us after HELLO.
		 * Without it, nothing is registered here and we start afresh. */
		A->event_fork = ef;
		A->welcome = 0;
		if (session_start(UF_AF_FORKED) < 0 && ef && (A->welcome == 0 || A->welcome == 2) &&
		    !A->uffd_err)
			call_again_forked();
	}
	return 0;
}

/*
 * swap.c - userspace swap: page stores, the per-process page table, the eviction
 * commit and the fault-side decisions the engine takes without Python.
 *
 * Page state lives here, in C, at 8 bytes per page (one uint64_t entry):
 *
 *     bits  0..31  store slot (0: none)
 *     bits 32..35  state: NONE, CLEAN, TRANSIT, EVICTED, ZERO
 *     bit  36      DROPPED: the application discarded or unmapped the page while it
 *                  was in transit - its data must not come back
 *     bits 48..63  stamp: the table's epoch when the page last came in (recency)
 *
 *   NONE     resident or never touched; the manager keeps no copy
 *   CLEAN    resident, write-protected, and the store holds an identical copy
 *   TRANSIT  chosen for eviction; faults (MISSING and WP) on it wait until commit
 *   EVICTED  not resident; the data is in the store at `slot`
 *   ZERO     not resident; the data was all zeros (nothing stored)
 *
 * The table is a hash of 4 KiB leaves, each covering 2 MiB of the target's address
 * space: a dense region costs 8 bytes per page, a sparse one at most one leaf per
 * touched 2 MiB.  The memory store's slot table adds 8 bytes per stored page (a
 * pointer; length and reference count sit in the blob's 4-byte header), the file
 * store's 2 bytes (a reference count).
 *
 * Why the target never reads a stale or zeroed page (the invariants):
 *  1. A page leaves the target only by UFFDIO_MOVE into the agent's scratch area,
 *     and only while its entry is TRANSIT.  Every fault on a TRANSIT entry - a read
 *     of the moved-out page (MISSING) or a write to the still-present page (WP) - is
 *     parked by the engine until uf_pt_commit has decided the page.
 *  2. uf_pt_commit marks a page EVICTED only after its bytes are in the store (or
 *     ZERO after checking every byte); a put that fails installs the bytes back with
 *     UFFDIO_COPY before the entry becomes NONE.  Pages the kernel did not move go
 *     back to their previous state untouched.
 *  3. A MISSING fault on EVICTED reads the store and installs with UFFDIO_COPY; the
 *     entry changes only after the copy succeeded.  Read faults install
 *     write-protected and keep the slot (CLEAN): the first write takes a WP fault
 *     that drops the slot (NONE) before the write is let through, so a CLEAN page
 *     is always identical to its slot and can be evicted again without reading it.
 *  4. Events are applied in message order: REMOVE/UNMAP drop entries (the data must
 *     not come back; a TRANSIT page is marked DROPPED), REMAP moves entries with the
 *     pages and is logged so a batch in flight finds its pages at their new address.
 *     A fork copies the table (slot references counted); a child forked while a
 *     batch is in flight receives the batch's outcome too.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include <liburing.h>
#include <lz4.h>

#include "compat.h"
#include "uffdio.h"
#include "swap.h"

#define PG 4096ULL
#define LEAF_SHIFT 9
#define LEAF_N (1u << LEAF_SHIFT)

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* An entry: bits 0-2 state, bit 3 DROPPED, bits 4-47 the store's handle (a 16-byte
 * aligned blob pointer for the memory store, slot << 4 for the file store), bits 48-63
 * the stamp. */
#define E_SLOT(x) ((x) & 0x0000FFFFFFFFFFF0ULL)
#define E_STATE(x) ((int)((x) & 7))
#define E_DROPPED (1ULL << 3)
#define E_STAMP(x) ((uint16_t)((x) >> 48))
#define E_MAKE(h, state, stamp) (((h) & 0x0000FFFFFFFFFFF0ULL) | (uint64_t)(state) | ((uint64_t)(uint16_t)(stamp) << 48))

/* ======================================================================== stores */

/* Handles: 0 = none.  Memory store: a blob (64-byte aligned, from blob_alloc) whose 4-byte
 * header is uint16 compressed length (0: stored raw) and uint16 reference count; no
 * index beyond the page table entry.  File store: slot number << 4; the slot's
 * reference count is the only index (2 bytes per slot of the file); a free slot is
 * found by a rotating cursor over the counts. */
#define BLOB_UNIT 64
#define BLOB_CLASSES ((4096 + 4 + BLOB_UNIT - 1) / BLOB_UNIT + 1)
#define BLOB_CHUNK (4UL << 20)

struct uf_store {
	int kind, users; /* users: the creator and every page table */
	pthread_mutex_t lock;
	int accel;
	/* external: reference counts by key (open addressing; key 0 = empty, refs 0 =
	 * deleted) and the keys whose last reference went, for the owner to discard */
	struct extref {
		uint64_t key;
		uint32_t refs;
	} *ext;
	size_t next, cap_ext, used_ext;
	uint64_t *gone;
	size_t ngone, capgone;
	/* file */
	uint16_t *refs; /* in the memfd mfd (see struct file_head) */
	struct file_head *fhead;
	int mfd;
	uint64_t nslots, capslots, cursor, max_slots;
	int fd, direct, ring_ok;
	struct io_uring ring;
	void *bounce;
	/* memory: blobs carved from big chunks by 64-byte class (no page fault per
	 * blob, no malloc lock); a freed blob goes to its class's free list.  The chunks
	 * are pages of a memfd (see struct mem_head) mapped at `base`; a handle is a
	 * blob's offset in it, so a manager that maps the memfd anywhere can read it. */
	void *freel[BLOB_CLASSES];
	char *bump, *bump_end;
	char *base;
	struct mem_head *head;
	size_t nchunks;
	int adopted; /* the memfd of a manager that died, taken over */
	struct uf_store_stats *st, own_st; /* st: in the memfd for the memory store */
};

/* The memory store's memfd: this header at offset 0 (chunk 0 holds nothing else), then
 * chunk k at k * BLOB_CHUNK.  The memfd outlives a killed manager in the agents that
 * keep a duplicate (see uf_store_fd): the header says how many chunks are in use and
 * keeps the counts, so that a manager taking over continues where it stopped. */
#define MEM_MAGIC 0x55464644494f4d31ULL /* "UFFDIOM1" */
#define MEM_RESERVE (1ULL << 36)	/* 64 GiB of address space, used as filled */
struct mem_head {
	uint64_t magic, version, nchunks, pad[5];
	struct uf_store_stats st;
};

static uint64_t hash64(uint64_t k);
static void st_lock(uf_store *s) { pthread_mutex_lock(&s->lock); }
static void st_unlock(uf_store *s) { pthread_mutex_unlock(&s->lock); }

/* A memfd mapped shared over `size` bytes of address space (NORESERVE: memory is used as
 * it is written): *fd < 0 makes a new one named `name` (closed again on failure); an
 * existing one (a dead manager's, kept by an agent) must be exactly that size (EINVAL).
 * Returns the mapping, or NULL with errno set.  The stores and page tables that outlive a
 * killed manager all live in one of these. */
static void *shm_map(int *fd, const char *name, uint64_t size)
{
	int made = *fd < 0, e;
	struct stat sb;
	void *m;

	if (made) {
		*fd = memfd_create(name, MFD_CLOEXEC);
		if (*fd < 0)
			return NULL;
		if (ftruncate(*fd, (off_t)size) < 0)
			goto fail;
	} else if (fstat(*fd, &sb) < 0 || (uint64_t)sb.st_size != size) {
		errno = EINVAL;
		return NULL;
	}
	m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, *fd, 0);
	if (m != MAP_FAILED)
		return m;
fail:
	if (made) {
		e = errno;
		close(*fd);
		*fd = -1;
		errno = e;
	}
	return NULL;
}

static int mem_map(uf_store *s)
{
	void *m = shm_map(&s->fd, "uffdio-swap-store", MEM_RESERVE);

	if (!m)
		return -1;
	s->base = m;
	s->head = m;
	s->st = &s->head->st;
	return 0;
}

/* A memory store in a new memfd (fd < 0), or the one of a manager that died (fd: its memfd,
 * which the store owns if it is returned).  An adopted store's blobs keep their reference
 * counts; space freed before the takeover is not reused (the free lists died with the
 * manager) until the store is empty again. */
static uf_store *memory_store(int fd, int accel, int *err)
{
	uf_store *s = calloc(1, sizeof(*s));

	if (!s) {
		*err = -ENOMEM;
		return NULL;
	}
	s->kind = UF_STORE_MEMORY;
	s->mfd = -1;
	s->users = 1;
	s->accel = accel > 0 ? accel : 1;
	s->fd = fd;
	if (mem_map(s) < 0) {
		*err = -errno;
		free(s);
		return NULL;
	}
	if (fd < 0) {
		s->head->magic = MEM_MAGIC;
		s->head->version = 1;
	} else if (s->head->magic != MEM_MAGIC || s->head->version != 1 ||
		   s->head->nchunks >= MEM_RESERVE / BLOB_CHUNK) {
		munmap(s->base, MEM_RESERVE);
		free(s);
		*err = -EBADMSG;
		return NULL;
	} else {
		s->nchunks = s->head->nchunks;
		s->adopted = 1;
	}
	pthread_mutex_init(&s->lock, NULL);
	*err = 0;
	return s;
}

uf_store *uf_store_memory(int accel, int *err) { return memory_store(-1, accel, err); }
uf_store *uf_store_memory_adopt(int fd, int accel, int *err) { return memory_store(fd, accel, err); }

/* The descriptor to hand to agents so that the store outlives us (-1: none can). */
int uf_store_fd(uf_store *s)
{
	return s->kind == UF_STORE_MEMORY ? s->fd : s->kind == UF_STORE_FILE ? s->mfd : -1;
}

/* The file store's reference counts live in a memfd too (this header, then a uint16_t
 * per slot at FMETA_OFF), so that a manager taking over after a kill knows which slots
 * of the swap file hold pages. */
#define FMETA_MAGIC 0x55464644494f4631ULL /* "UFFDIOF1" */
#define FMETA_OFF 4096ULL
#define FMETA_SLOTS (1ULL << 32) /* 16 TiB of swap file */
#define FMETA_SIZE (FMETA_OFF + FMETA_SLOTS * 2)
struct file_head {
	uint64_t magic, version, nslots, max_slots, pad[4];
	struct uf_store_stats st;
};

static int fmeta_map(uf_store *s)
{
	void *m = shm_map(&s->mfd, "uffdio-swap-file-refs", FMETA_SIZE);

	if (!m)
		return -1;
	s->fhead = m;
	s->refs = (uint16_t *)((char *)m + FMETA_OFF);
	s->capslots = FMETA_SLOTS;
	s->st = &s->fhead->st;
	return 0;
}

/* fd: the swap file; meta_fd: its memfd of reference counts, -1 to make one (a new
 * file).  The store owns both if it is returned (closed when the last page table lets
 * go). */
static uf_store *file_store(int fd, int meta_fd, uint64_t max_bytes, int *err)
{
	uf_store *s = calloc(1, sizeof(*s));
	int fl, r;

	if (!s) {
		*err = -ENOMEM;
		return NULL;
	}
	s->kind = UF_STORE_FILE;
	s->users = 1;
	s->fd = fd;
	s->mfd = meta_fd;
	if (fmeta_map(s) < 0) {
		*err = -errno;
		free(s);
		return NULL;
	}
	if (meta_fd < 0) {
		s->fhead->magic = FMETA_MAGIC;
		s->fhead->version = 1;
		s->fhead->max_slots = max_bytes && max_bytes / PG < FMETA_SLOTS ? max_bytes / PG : FMETA_SLOTS;
	} else if (s->fhead->magic != FMETA_MAGIC || s->fhead->version != 1 ||
		   s->fhead->nslots > s->fhead->max_slots || s->fhead->max_slots > FMETA_SLOTS) {
		munmap(s->fhead, FMETA_SIZE);
		free(s);
		*err = -EBADMSG;
		return NULL;
	}
	s->max_slots = s->fhead->max_slots;
	s->nslots = s->fhead->nslots;
	fl = fcntl(fd, F_GETFL);
	s->direct = fl >= 0 && (fl & O_DIRECT);
	if (posix_memalign(&s->bounce, PG, PG)) {
		munmap(s->fhead, FMETA_SIZE);
		if (meta_fd < 0)
			close(s->mfd);
		free(s);
		*err = -ENOMEM;
		return NULL;
	}
	r = io_uring_queue_init(64, &s->ring, 0);
	if (r < 0) {
		free(s->bounce);
		munmap(s->fhead, FMETA_SIZE);
		if (meta_fd < 0)
			close(s->mfd);
		free(s);
		*err = r;
		return NULL;
	}
	s->ring_ok = 1;
	pthread_mutex_init(&s->lock, NULL);
	*err = 0;
	return s;
}

uf_store *uf_store_file(int fd, uint64_t max_bytes, int *err) { return file_store(fd, -1, max_bytes, err); }

/* Take over the swap file of a manager that died (fd) and its reference counts (meta_fd,
 * the memfd an agent kept): the store owns both if it is returned. */
uf_store *uf_store_file_adopt(int fd, int meta_fd, int *err) { return file_store(fd, meta_fd, 0, err); }

/* The swap file of a file store (-1 for other stores): agents keep it with uf_store_fd's. */
int uf_store_file_fd(uf_store *s) { return s->kind == UF_STORE_FILE ? s->fd : -1; }

uf_store *uf_store_external(int *err)
{
	uf_store *s = calloc(1, sizeof(*s));

	if (!s) {
		*err = -ENOMEM;
		return NULL;
	}
	s->kind = UF_STORE_EXTERNAL;
	s->mfd = -1;
	s->st = &s->own_st;
	s->users = 1;
	s->fd = -1;
	pthread_mutex_init(&s->lock, NULL);
	*err = 0;
	return s;
}

static struct extref *ext_find(uf_store *s, uint64_t key, int create)
{
	size_t i, mask;

	if (create && (s->used_ext + 1) * 2 > s->cap_ext) {
		size_t nc = s->cap_ext ? s->cap_ext * 2 : 1024, j;
		struct extref *nt = calloc(nc, sizeof(*nt));
		if (!nt)
			return NULL;
		s->used_ext = 0;
		for (j = 0; j < s->cap_ext; j++) {
			if (!s->ext[j].key || !s->ext[j].refs)
				continue;
			for (i = hash64(s->ext[j].key) & (nc - 1); nt[i].key; i = (i + 1) & (nc - 1))
				;
			nt[i] = s->ext[j];
			s->used_ext++;
		}
		free(s->ext);
		s->ext = nt;
		s->cap_ext = nc;
	}
	if (!s->cap_ext)
		return NULL;
	mask = s->cap_ext - 1;
	for (i = hash64(key) & mask;; i = (i + 1) & mask) {
		if (s->ext[i].key == key)
			return &s->ext[i];
		if (!s->ext[i].key) {
			if (!create)
				return NULL;
			s->ext[i].key = key;
			s->ext[i].refs = 0;
			s->used_ext++;
			return &s->ext[i];
		}
	}
}

/* Keys whose last reference went (the owner discards them).  Returns how many. */
int64_t uf_store_take_discarded(uf_store *s, uint64_t *out, size_t max)
{
	size_t n;

	st_lock(s);
	n = s->ngone < max ? s->ngone : max;
	memcpy(out, s->gone + (s->ngone - n), n * sizeof(uint64_t));
	s->ngone -= n;
	st_unlock(s);
	return (int64_t)n;
}

/* An external store's new handle (one reference), for key (1 .. 2^44 - 1). */
int uf_store_external_add(uf_store *s, uint64_t key)
{
	struct extref *r;

	if (!key || key >= (1ULL << 44))
		return -EINVAL;
	st_lock(s);
	r = ext_find(s, key, 1);
	if (r) {
		r->refs++;
		s->st->slots_used++;
		s->st->puts++;
		s->st->bytes_in += PG;
		s->st->bytes_stored += PG;
	}
	st_unlock(s);
	return r ? 0 : -ENOMEM;
}

/* Blobs still referenced when the store is freed belong to page tables that were
 * freed first (they drop their references), so nothing is left here but the file. */
void uf_store_free(uf_store *s)
{
	if (!s || __atomic_sub_fetch(&s->users, 1, __ATOMIC_ACQ_REL) > 0)
		return;
	if (s->fhead)
		munmap(s->fhead, FMETA_SIZE);
	if (s->mfd >= 0)
		close(s->mfd);
	free(s->ext);
	free(s->gone);
	free(s->bounce);
	if (s->base)
		munmap(s->base, MEM_RESERVE);
	if (s->ring_ok)
		io_uring_queue_exit(&s->ring);
	if (s->fd >= 0)
		close(s->fd); /* the store owns the swap file's descriptor, or its memfd */
	pthread_mutex_destroy(&s->lock);
	free(s);
}

void uf_store_get_stats(uf_store *s, struct uf_store_stats *out)
{
	st_lock(s);
	*out = *s->st;
	out->slots_cap = s->max_slots;
	out->meta_bytes = s->nslots * sizeof(uint16_t);
	out->reserved_bytes = s->nchunks * BLOB_CHUNK;
	st_unlock(s);
}

/* A free file slot (lock held), or 0 when the file is at its size limit. */
static uint64_t file_slot_alloc(uf_store *s)
{
	uint64_t i;

	if (s->st->slots_used < s->nslots) { /* a freed slot exists: the cursor finds it */
		for (i = 0; i < s->nslots; i++) {
			uint64_t k = (s->cursor + i) % s->nslots;
			if (!s->refs[k]) {
				s->cursor = k + 1;
				return k + 1;
			}
		}
	}
	if (s->nslots >= s->max_slots)
		return 0;
	s->fhead->nslots = ++s->nslots;
	return s->nslots; /* slot k is refs[k - 1], file offset (k - 1) * 4096 */
}

static uint16_t *mem_hdr(uf_store *s, uint64_t h) { return (uint16_t *)(s->base + h); }

/* A blob of `size` bytes (lock held): 64-byte aligned, or NULL. */
static void *blob_alloc(uf_store *s, size_t size)
{
	size_t c = (size + BLOB_UNIT - 1) / BLOB_UNIT;
	void *b = s->freel[c];

	if (b) {
		s->freel[c] = *(void **)b;
		return b;
	}
	size = c * BLOB_UNIT;
	if (!s->bump || s->bump + size > s->bump_end) {
		char *ch;
		if (s->nchunks + 1 >= MEM_RESERVE / BLOB_CHUNK)
			return NULL;
		ch = s->base + (s->nchunks + 1) * BLOB_CHUNK;
		/* populated at once: one call instead of a fault per page (ENOMEM: full) */
		if (madvise(ch, BLOB_CHUNK, MADV_POPULATE_WRITE) < 0 && errno != EINVAL)
			return NULL;
		s->nchunks++;
		s->head->nchunks = s->nchunks; /* before any blob of it is handed out */
		s->bump = ch;
		s->bump_end = (char *)ch + BLOB_CHUNK;
	}
	b = s->bump;
	s->bump += size;
	return b;
}

static void blob_free(uf_store *s, void *b, size_t size)
{
	size_t c = (size + BLOB_UNIT - 1) / BLOB_UNIT;

	*(void **)b = s->freel[c];
	s->freel[c] = b;
}

/* The memory store holds no page any more (lock held): give every chunk back to the
 * system, so that the manager's memory goes down to nothing when the programs' pages have
 * all come back or the programs exited.  slots_used counts every blob handed out, those
 * still being filled by compress_pages included, so no blob is in use here. */
static void blobs_release_if_empty(uf_store *s)
{
	if (s->kind != UF_STORE_MEMORY || s->st->slots_used || !s->nchunks)
		return;
	s->head->nchunks = 0;
	fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)BLOB_CHUNK,
		  (off_t)(s->nchunks * BLOB_CHUNK));
	s->nchunks = 0;
	s->bump = s->bump_end = NULL;
	memset(s->freel, 0, sizeof(s->freel));
}

/* Drop one reference to a handle (lock held). */
static void slot_put_ref(uf_store *s, uint64_t h)
{
	if (!h)
		return;
	if (s->kind == UF_STORE_MEMORY) {
		uint16_t *hd = mem_hdr(s, h);
		if (--hd[1] == 0) {
			uint32_t len = hd[0] ? hd[0] : PG;
			s->st->bytes_stored -= len + 4;
			s->st->slots_used--;
			s->st->discards++;
			blob_free(s, hd, len + 4);
			blobs_release_if_empty(s);
		}
	} else if (s->kind == UF_STORE_EXTERNAL) {
		struct extref *r = ext_find(s, h >> 4, 0);
		if (r && r->refs && --r->refs == 0) {
			s->st->bytes_stored -= PG;
			s->st->slots_used--;
			s->st->discards++;
			if (s->ngone == s->capgone) {
				size_t nc = s->capgone ? s->capgone * 2 : 1024;
				uint64_t *ng = realloc(s->gone, nc * sizeof(*ng));
				if (ng) {
					s->gone = ng;
					s->capgone = nc;
				}
			}
			if (s->ngone < s->capgone)
				s->gone[s->ngone++] = h >> 4;
		}
	} else {
		uint64_t k = h >> 4;
		if (k && k <= s->nslots && s->refs[k - 1] && --s->refs[k - 1] == 0) {
			s->st->bytes_stored -= PG;
			s->st->slots_used--;
			s->st->discards++;
		}
	}
}

static void slot_get_ref(uf_store *s, uint64_t h)
{
	if (!h)
		return;
	if (s->kind == UF_STORE_MEMORY) {
		mem_hdr(s, h)[1]++;
	} else if (s->kind == UF_STORE_EXTERNAL) {
		struct extref *r = ext_find(s, h >> 4, 0);
		if (r)
			r->refs++;
	} else if ((h >> 4) && (h >> 4) <= s->nslots)
		s->refs[(h >> 4) - 1]++;
}

void uf_store_unref(uf_store *s, uint64_t h)
{
	st_lock(s);
	slot_put_ref(s, h);
	st_unlock(s);
}

/* The next completion of a store's ring.  A signal must not make us leave a request
 * unreaped: a later wait would take its completion for its own (a read reported done
 * before its data arrived). */
static int ring_wait(struct io_uring *r, struct io_uring_cqe **cqe)
{
	int rc;

	do
		rc = io_uring_wait_cqe(r, cqe);
	while (rc == -EINTR);
	return rc;
}

/* ---- parallel compression ----
 * One process-wide helper thread takes the second half of a batch while the caller
 * does the first: eviction throughput is bound by LZ4 when the target is idle, and the
 * manager usually has a second CPU.  A caller that finds the helper busy (two stores
 * evicting at once) does everything itself.  Each thread compresses a page into a
 * small buffer of its own (it stays in L1) and copies the result straight into the
 * page's blob: no batch-sized output buffer, no second pass over it. */
#define CB 4160 /* >= LZ4_COMPRESSBOUND(4096), a multiple of 64 */

struct zjob {
	uf_store *s;
	const char *base;
	const uint64_t *offs; /* page i at base + offs[i] (NULL: base + i * 4096) */
	uint64_t *handles;
	size_t lo, hi;
	size_t stop; /* out: the first page not stored (hi when all were) */
};

#define ZGROUP 16 /* pages compressed between two takes of the store lock */

static void zjob_run(struct zjob *j)
{
	static __thread char tmp[ZGROUP][CB] __attribute__((aligned(64)));
	uf_store *s = j->s;
	size_t i = j->lo, g, m;

	while (i < j->hi) {
		uint32_t len[ZGROUP];
		unsigned char *b[ZGROUP];
		const char *src[ZGROUP];
		m = j->hi - i < ZGROUP ? j->hi - i : ZGROUP;
		for (g = 0; g < m; g++) {
			int c;
			src[g] = j->base + (j->offs ? j->offs[i + g] : (i + g) * PG);
			c = LZ4_compress_fast(src[g], tmp[g], (int)PG, CB, s->accel);
			/* incompressible (or nearly): stored raw, header length 0 */
			len[g] = (c > 0 && c < (int)PG - 64) ? (uint32_t)c : (uint32_t)PG;
		}
		st_lock(s);
		for (g = 0; g < m; g++) {
			b[g] = blob_alloc(s, len[g] + 4);
			if (!b[g])
				break;
			/* counted at once: the store is never seen empty while we fill it */
			s->st->slots_used++;
			s->st->bytes_stored += len[g] + 4;
		}
		st_unlock(s);
		for (m = g, g = 0; g < m; g++, i++) {
			uint16_t *hd = (uint16_t *)b[g];
			hd[0] = len[g] == PG ? 0 : (uint16_t)len[g];
			hd[1] = 1;
			memcpy(b[g] + 4, len[g] == PG ? src[g] : tmp[g], len[g]);
			j->handles[i] = (uint64_t)((char *)b[g] - s->base);
		}
		if (m < ZGROUP && i < j->hi)
			break; /* no blob: the store is out of memory */
	}
	j->stop = i;
}

/* The helper: par_start() gives it fn(arg) if it is free (returns 1; par_wait() waits
 * for it), else returns 0 and the caller does that part itself. */
static struct {
	pthread_mutex_t lock;
	pthread_cond_t cv;
	int started, busy, done;
	void (*fn)(void *);
	void *arg; /* the caller's, until done */
} zpool = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL, NULL };

static void *zpool_main(void *unused)
{
	(void)unused;
	pthread_mutex_lock(&zpool.lock);
	for (;;) {
		while (!zpool.fn)
			pthread_cond_wait(&zpool.cv, &zpool.lock);
		void (*fn)(void *) = zpool.fn;
		void *arg = zpool.arg;
		pthread_mutex_unlock(&zpool.lock);
		fn(arg);
		pthread_mutex_lock(&zpool.lock);
		zpool.fn = NULL;
		zpool.done = 1;
		pthread_cond_broadcast(&zpool.cv);
	}
	return NULL;
}

/* A forked child has no helper thread: start afresh (pthread_atfork, registered once). */
static void zpool_atfork_child(void)
{
	pthread_mutex_init(&zpool.lock, NULL);
	pthread_cond_init(&zpool.cv, NULL);
	zpool.started = zpool.busy = zpool.done = 0;
	zpool.fn = NULL;
}
static pthread_once_t zpool_once = PTHREAD_ONCE_INIT;
static void zpool_init_once(void) { pthread_atfork(NULL, NULL, zpool_atfork_child); }

static int par_start(void (*fn)(void *), void *arg)
{
	int taken = 0;

	pthread_once(&zpool_once, zpool_init_once);
	pthread_mutex_lock(&zpool.lock);
	if (!zpool.started) {
		pthread_t t;
		pthread_attr_t at;
		pthread_attr_init(&at);
		pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
		if (pthread_create(&t, &at, zpool_main, NULL) == 0)
			zpool.started = 1;
		pthread_attr_destroy(&at);
	}
	if (zpool.started && !zpool.busy) {
		zpool.busy = 1;
		zpool.fn = fn;
		zpool.arg = arg;
		zpool.done = 0;
		pthread_cond_broadcast(&zpool.cv);
		taken = 1;
	}
	pthread_mutex_unlock(&zpool.lock);
	return taken;
}

static void par_wait(void)
{
	pthread_mutex_lock(&zpool.lock);
	while (!zpool.done)
		pthread_cond_wait(&zpool.cv, &zpool.lock);
	zpool.busy = 0;
	pthread_mutex_unlock(&zpool.lock);
}

static void zjob_run_v(void *j) { zjob_run(j); }

/* Memory store: compress pages [0, n) into blobs, handles[i] for each.  Returns the
 * number stored, a prefix: when a blob cannot be had, the pages after the first
 * failure are let go even if the other thread stored them. */
static size_t compress_pages(uf_store *s, const char *base, const uint64_t *offs, size_t n,
			     uint64_t *handles)
{
	struct zjob mine = { s, base, offs, handles, 0, n, 0 }, other = mine;
	int helped = 0;
	size_t i, stored;

	if (n >= 32) {
		other.lo = n / 2;
		helped = par_start(zjob_run_v, &other);
		if (helped)
			mine.hi = n / 2;
	}
	zjob_run(&mine);
	if (helped)
		par_wait();
	stored = mine.stop;
	if (helped && mine.stop < mine.hi) { /* a hole in the middle: the rest goes */
		st_lock(s);
		for (i = other.lo; i < other.stop; i++) {
			uint16_t *hd = mem_hdr(s, handles[i]);
			uint32_t len = hd[0] ? hd[0] : (uint32_t)PG;
			s->st->bytes_stored -= len + 4;
			s->st->slots_used--;
			blob_free(s, hd, len + 4);
		}
		blobs_release_if_empty(s);
		st_unlock(s);
	} else if (helped) {
		stored = other.stop;
	}
	return stored;
}

/* Store n pages, page i at base + offs[i] (offs NULL: base + i * 4096); handles_out[i]
 * gets each page's handle (one reference).  Returns the number stored (a prefix), or
 * -errno when none was.  The memory store compresses on two threads; the file store
 * writes the batch through its ring (pages must be 4 KiB aligned for O_DIRECT). */
static int64_t store_put_pages(uf_store *s, const char *base, const uint64_t *offs, size_t n,
			       uint64_t *handles_out)
{
	size_t i, k;
	int64_t err = 0;

#define PAGE_AT(i) (base + (offs ? offs[i] : (i) * PG))
	if (s->kind == UF_STORE_EXTERNAL)
		return -EOPNOTSUPP; /* its owner stores the pages */
	if (s->kind == UF_STORE_MEMORY) {
		i = compress_pages(s, base, offs, n, handles_out); /* takes the lock per blob */
		st_lock(s);
		if (i < n)
			err = -ENOMEM;
	} else {
		st_lock(s);
		for (i = 0; i < n; i++) {
			uint64_t k2 = file_slot_alloc(s);
			if (!k2) {
				err = -ENOSPC;
				break;
			}
			s->refs[k2 - 1] = 1; /* reserved while written */
			s->st->slots_used++;
			handles_out[i] = k2 << 4;
		}
		n = i;
		for (k = 0; k < n;) {
			/* up to 64 pages per round; pages whose slots follow each other go in one
			 * vectored write (slots are handed out in file order, so a batch is mostly
			 * one run): far fewer, bigger requests than one 4 KiB write per page */
			size_t m = n - k > 64 ? 64 : n - k, j, nreq = 0;
			struct iovec iov[64];
			struct io_uring_cqe *cqe;
			int bad = 0;
			for (j = 0; j < m;) {
				size_t j0 = j;
				uint64_t slot0 = (handles_out[k + j] >> 4) - 1;
				do {
					iov[j].iov_base = (void *)PAGE_AT(k + j);
					iov[j].iov_len = PG;
					j++;
				} while (j < m && (handles_out[k + j] >> 4) - 1 == slot0 + (j - j0));
				struct io_uring_sqe *sqe = io_uring_get_sqe(&s->ring);
				io_uring_prep_writev(sqe, s->fd, &iov[j0], (unsigned)(j - j0), slot0 * PG);
				io_uring_sqe_set_data64(sqe, (j - j0) * PG); /* the bytes it must write */
				nreq++;
			}
			io_uring_submit(&s->ring);
			for (j = 0; j < nreq; j++) {
				if (ring_wait(&s->ring, &cqe) < 0) {
					bad = -EIO;
					continue;
				}
				if ((uint64_t)(int64_t)cqe->res != io_uring_cqe_get_data64(cqe) && !bad)
					bad = cqe->res < 0 ? cqe->res : -ENOSPC; /* short write: full */
				io_uring_cqe_seen(&s->ring, cqe);
			}
			if (bad) {
				/* which write of the chunk failed is not worth tracking: none counts */
				err = bad;
				break;
			}
			k += m;
		}
		for (i = k; i < n; i++) { /* give back what was not written */
			s->refs[(handles_out[i] >> 4) - 1] = 0;
			s->st->slots_used--;
		}
		/* free slots at the end of the file may never have been written (holes past
		 * what the filesystem gave us): forget them, so that the next put reuses the
		 * freed slots inside the file before it tries to grow it again */
		while (s->nslots && !s->refs[s->nslots - 1])
			s->nslots--;
		s->fhead->nslots = s->nslots;
		if (s->cursor >= s->nslots)
			s->cursor = 0;
		s->st->bytes_stored += k * PG;
		i = k;
	}
	s->st->puts += i;
	s->st->bytes_in += i * PG;
	if (err)
		s->st->put_errors++;
	st_unlock(s);
	return i ? (int64_t)i : (err ? err : 0);
#undef PAGE_AT
}

/* Store n contiguous pages (see store_put_pages). */
int64_t uf_store_put(uf_store *s, const void *pages, size_t n, uint64_t *handles_out)
{
	return store_put_pages(s, pages, NULL, n, handles_out);
}

/* Read the page of handle h into out (4096 bytes). */
int uf_store_get(uf_store *s, uint64_t h, void *out)
{
	int rc = 0;

	if (!h)
		return -EINVAL;
	if (s->kind == UF_STORE_EXTERNAL)
		return -EOPNOTSUPP;
	if (s->kind == UF_STORE_MEMORY) {
		/* a blob is immutable while referenced, and the caller holds a reference
		 * through its page table entry: no lock needed */
		uint16_t *hd = mem_hdr(s, h);
		const char *data = (const char *)hd + 4;
		if (hd[0] == 0)
			memcpy(out, data, PG);
		else if (LZ4_decompress_safe(data, out, hd[0], (int)PG) != (int)PG)
			rc = -EIO;
		st_lock(s);
	} else {
		struct io_uring_sqe *sqe;
		struct io_uring_cqe *cqe;
		void *dst;
		st_lock(s);
		dst = s->direct ? s->bounce : out;
		sqe = io_uring_get_sqe(&s->ring);
		io_uring_prep_read(sqe, s->fd, dst, (unsigned)PG, ((h >> 4) - 1) * PG);
		io_uring_submit(&s->ring);
		rc = ring_wait(&s->ring, &cqe);
		if (rc == 0) {
			rc = cqe->res == (int)PG ? 0 : (cqe->res < 0 ? cqe->res : -EIO);
			io_uring_cqe_seen(&s->ring, cqe);
		}
		if (rc == 0 && dst != out)
			memcpy(out, dst, PG);
	}
	if (rc)
		s->st->get_errors++;
	else
		s->st->gets++;
	st_unlock(s);
	return rc;
}

/* ==================================================================== page table */

struct uf_pt;
static void persist_batch(struct uf_pt *pt, uint64_t scratch);
static int defer_copyback(struct uf_pt *pt, uint64_t addr, const void *data);

struct leafslot {
	uint64_t key; /* (vpn >> LEAF_SHIFT) + 1; 0 = empty */
	uint64_t *ents;
};

struct remap {
	uint64_t from, to, len;
};

/* A page table's memfd: the header, the batch in flight (its runs in batch order, where
 * they went in the scratch area, the remaps since it began), a directory of leaf keys
 * and the leaves.  Entries are written in place by the code below (8-byte stores, in
 * an order that never lets an entry name a freed blob: see ent_swap), so the memfd is
 * always a table that a manager taking over can trust (uf_pt_adopt, uf_pt_recover). */
#define PT_MAGIC 0x55464644494f5431ULL /* "UFFDIOT1" */
#define PT_RUNS_OFF 4096ULL
#define PT_RUNS_MAX 16384ULL /* (addr, len) pairs */
#define PT_LOG_OFF (PT_RUNS_OFF + PT_RUNS_MAX * 16)
#define PT_LOG_MAX 4096ULL
#define PT_DIR_OFF (1ULL << 20)
#define PT_LEAVES_MAX (1ULL << 20) /* 2 TiB of a process's address space */
#define PT_LEAF_OFF (PT_DIR_OFF + PT_LEAVES_MAX * 8)
#define PT_SIZE (PT_LEAF_OFF + PT_LEAVES_MAX * LEAF_N * 8)
struct pt_head {
	uint64_t magic, version, store_kind, nleaves;
	uint64_t nruns;	   /* the batch in flight: 0 when none */
	uint64_t scratch;  /* where its pages are moved (0: not known yet) */
	uint64_t nlog;	   /* remaps since it began */
	uint64_t unknown;  /* its runs or remaps did not fit: find pages by state only */
	/* a REMAP being applied (len 0: none): phase 1 drops the destination's entries,
	 * phase 2 moves the source's (see uf_pt_event, remap_finish) */
	uint64_t remap_from, remap_to, remap_len, remap_phase;
};
#define PT_RUNS(pt) ((uint64_t *)((pt)->tmap + PT_RUNS_OFF))
#define PT_LOG(pt) ((struct remap *)((pt)->tmap + PT_LOG_OFF))
#define PT_DIR(pt) ((uint64_t *)((pt)->tmap + PT_DIR_OFF))

struct uf_pt {
	pthread_mutex_t lock;
	int refs;
	uf_store *store;
	struct uf_budget *budget;
	int uffd, kick_fd, wp;
	uint32_t exempt_tid; /* the agent thread: never held at the limit */
	uint16_t epoch;

	struct leafslot *tab;
	size_t ntab, nleaves;
	/* the table's memfd (see struct pt_head), mapped at tmap: its leaves and the batch
	 * in flight outlive a killed manager in the agent, which keeps a duplicate */
	int tfd;
	char *tmap;
	struct pt_head *th;

	uint64_t counts[5]; /* pages per state (NONE counts only pages with an entry) */

	/* the batch in flight */
	int batch;
	uint64_t *runs; /* (addr, len) pairs as marked by begin */
	size_t nruns, capruns;
	struct remap *log;
	size_t nlog, caplog;
	int keep; /* an agent keeps the memfd: the entries' references outlive us */
	uint64_t *trip; /* (src, dst, len) as handed to the agent's MOVE */
	size_t ntrip, captrip;
	uf_pt **kids; /* forked while the batch was in flight */
	size_t nkids;
	/* an external store's batch between collect and commit */
	uint64_t *pend_moved, *pend_read;
	size_t pend_nmoved, pend_nread;
	int pend_ok;
	/* pages whose copy-back after a failed store put met EAGAIN (events pending): they
	 * stay TRANSIT (faults wait) until finish_copybacks installs them */
	struct copyback {
		uint64_t addr;
		char *data;
		int failed; /* counted in store_errors once */
	} *cb;
	size_t ncb, capcb;

	/* read-ahead */
	uint64_t last_fault, ra_window;
	/* fault-around of first-touch writes: next expected vpn, window (pages) */
	uint64_t ft_next, ft_window;

	struct uf_pt_stats st;
};

struct uf_budget {
	int64_t resident;	/* pages, approximately (resynced by Python) */
	int64_t limit;		/* faults that would go past it wait for eviction */
	int notify_fd;
	uint64_t parked;	/* faults parked so far */
};

uf_budget *uf_budget_new(int64_t limit_pages, int notify_fd)
{
	uf_budget *b = calloc(1, sizeof(*b));
	if (!b)
		return NULL;
	b->limit = limit_pages;
	b->notify_fd = notify_fd;
	return b;
}

void uf_budget_free(uf_budget *b) { free(b); }

void uf_budget_set(uf_budget *b, int64_t limit_pages, int64_t resident_pages)
{
	if (limit_pages >= 0)
		__atomic_store_n(&b->limit, limit_pages, __ATOMIC_RELAXED);
	if (resident_pages >= 0)
		__atomic_store_n(&b->resident, resident_pages, __ATOMIC_RELAXED);
}

int64_t uf_budget_resident(uf_budget *b) { return __atomic_load_n(&b->resident, __ATOMIC_RELAXED); }
uint64_t uf_budget_parked(uf_budget *b) { return __atomic_load_n(&b->parked, __ATOMIC_RELAXED); }

static void budget_add(uf_budget *b, int64_t n)
{
	if (b)
		__atomic_fetch_add(&b->resident, n, __ATOMIC_RELAXED);
}

/* Drop a page table's reference to a store handle (pt->lock held). */
static void pt_drop_handle(uf_pt *pt, uint64_t h)
{
	st_lock(pt->store);
	slot_put_ref(pt->store, h);
	st_unlock(pt->store);
}

static uint64_t hash64(uint64_t k)
{
	k ^= k >> 33;
	k *= 0xff51afd7ed558ccdULL;
	k ^= k >> 33;
	return k;
}

static struct leafslot *tab_find(uf_pt *pt, uint64_t key)
{
	size_t mask = pt->ntab - 1, i;

	if (!pt->ntab)
		return NULL;
	for (i = hash64(key) & mask;; i = (i + 1) & mask) {
		if (pt->tab[i].key == key)
			return &pt->tab[i];
		if (pt->tab[i].key == 0)
			return NULL;
	}
}

static int tab_grow(uf_pt *pt)
{
	size_t n = pt->ntab ? pt->ntab * 2 : 64, i, mask = n - 1;
	struct leafslot *nt = calloc(n, sizeof(*nt));

	if (!nt)
		return -ENOMEM;
	for (i = 0; i < pt->ntab; i++) {
		size_t j;
		if (!pt->tab[i].key)
			continue;
		for (j = hash64(pt->tab[i].key) & mask; nt[j].key; j = (j + 1) & mask)
			;
		nt[j] = pt->tab[i];
	}
	free(pt->tab);
	pt->tab = nt;
	pt->ntab = n;
	return 0;
}

/* A zeroed leaf for key from the memfd (lock held); the directory names it before the
 * header counts it.  The caller puts it into the hash. */
static uint64_t *leaf_new(uf_pt *pt, uint64_t key)
{
	uint64_t i = pt->th->nleaves;

	if (i >= PT_LEAVES_MAX)
		return NULL;
	PT_DIR(pt)[i] = key;
	__atomic_store_n(&pt->th->nleaves, i + 1, __ATOMIC_RELEASE);
	return (uint64_t *)(pt->tmap + PT_LEAF_OFF + i * LEAF_N * 8);
}

/* The entry for addr; NULL when it has none (and create == 0 or no memory). */
static uint64_t *ent_at(uf_pt *pt, uint64_t addr, int create)
{
	uint64_t vpn = addr / PG, key = (vpn >> LEAF_SHIFT) + 1;
	struct leafslot *ls = tab_find(pt, key);

	if (!ls) {
		size_t mask, j;
		uint64_t *leaf;
		if (!create)
			return NULL;
		if ((pt->nleaves + 1) * 2 > pt->ntab && tab_grow(pt))
			return NULL;
		leaf = leaf_new(pt, key);
		if (!leaf)
			return NULL;
		mask = pt->ntab - 1;
		for (j = hash64(key) & mask; pt->tab[j].key; j = (j + 1) & mask)
			;
		pt->tab[j].key = key;
		pt->tab[j].ents = leaf;
		pt->nleaves++;
		ls = &pt->tab[j];
	}
	return &ls->ents[vpn & (LEAF_N - 1)];
}

static uint64_t ent_get(uf_pt *pt, uint64_t addr)
{
	uint64_t *e = ent_at(pt, addr, 0);
	return e ? *e : 0;
}

/* Set an entry, keeping the per-state counts (lock held). */
static void ent_set(uf_pt *pt, uint64_t *e, uint64_t v)
{
	pt->counts[E_STATE(*e)]--;
	pt->counts[E_STATE(v)]++;
	*e = v;
}

/* Set an entry, then let go of the store handle it no longer names: a manager killed
 * between the two leaks a reference, never leaves an entry naming a freed blob. */
static void ent_swap(uf_pt *pt, uint64_t *e, uint64_t v)
{
	uint64_t old = E_SLOT(*e);

	ent_set(pt, e, v);
	if (old && old != E_SLOT(v))
		pt_drop_handle(pt, old);
}

static int ent_put(uf_pt *pt, uint64_t addr, uint64_t v)
{
	uint64_t *e = ent_at(pt, addr, 1);
	if (!e)
		return -ENOMEM;
	if (*e == 0 && v == 0)
		return 0;
	if (*e == 0)
		pt->counts[UF_PG_NONE]++; /* entries that did not exist count as NONE first */
	ent_set(pt, e, v);
	return 0;
}

static int pt_map(uf_pt *pt)
{
	void *m = shm_map(&pt->tfd, "uffdio-page-table", PT_SIZE);

	if (!m)
		return -1;
	pt->tmap = m;
	pt->th = m;
	return 0;
}

static void pt_init(uf_pt *pt, uf_store *store)
{
	pthread_mutex_init(&pt->lock, NULL);
	pt->refs = 1;
	pt->store = store;
	__atomic_fetch_add(&store->users, 1, __ATOMIC_RELAXED);
	pt->uffd = -1;
	pt->kick_fd = -1;
	pt->epoch = 1;
}

/* The descriptor of the table's memfd, for the agent to keep, and its store's. */
int uf_pt_fd(uf_pt *pt) { return pt->tfd; }

/* on: the process's agent holds a duplicate of this table's memfd (and of the store's),
 * so when we let go of the table its entries' references stay in the store - the
 * pages are the process's, for whichever manager takes it over (a manager that ends
 * without giving the process back, on an error or a crash, must not free them).
 * off: the process is gone, or was given back: the references go with the table. */
void uf_pt_keep(uf_pt *pt, int on)
{
	__atomic_store_n(&pt->keep, on, __ATOMIC_RELEASE);
}
int uf_pt_store_fd(uf_pt *pt) { return uf_store_fd(pt->store); }
int uf_pt_store_file_fd(uf_pt *pt) { return uf_store_file_fd(pt->store); }

uf_pt *uf_pt_new(uf_store *store, int *err)
{
	uf_pt *pt = calloc(1, sizeof(*pt));

	if (!pt) {
		*err = -ENOMEM;
		return NULL;
	}
	pt->tfd = -1;
	if (pt_map(pt) < 0) {
		*err = -errno;
		free(pt);
		return NULL;
	}
	pt->th->magic = PT_MAGIC;
	pt->th->version = 1;
	pt->th->store_kind = (uint64_t)store->kind;
	pt_init(pt, store);
	*err = 0;
	return pt;
}

uf_pt *uf_pt_ref(uf_pt *pt)
{
	__atomic_fetch_add(&pt->refs, 1, __ATOMIC_RELAXED);
	return pt;
}

void uf_pt_unref(uf_pt *pt)
{
	size_t i, j;

	if (!pt || __atomic_sub_fetch(&pt->refs, 1, __ATOMIC_ACQ_REL) > 0)
		return;
	if (!__atomic_load_n(&pt->keep, __ATOMIC_ACQUIRE)) {
		st_lock(pt->store);
		for (i = 0; i < pt->ntab; i++) {
			if (!pt->tab[i].key)
				continue;
			for (j = 0; j < LEAF_N; j++)
				slot_put_ref(pt->store, E_SLOT(pt->tab[i].ents[j]));
		}
		st_unlock(pt->store);
	}
	for (i = 0; i < pt->nkids; i++)
		uf_pt_unref(pt->kids[i]);
	free(pt->kids);
	free(pt->tab);
	free(pt->runs);
	free(pt->trip);
	free(pt->log);
	free(pt->pend_moved);
	free(pt->pend_read);
	for (i = 0; i < pt->ncb; i++)
		free(pt->cb[i].data);
	free(pt->cb);
	uf_store_free(pt->store);
	munmap(pt->tmap, PT_SIZE);
	close(pt->tfd);
	pthread_mutex_destroy(&pt->lock);
	free(pt);
}

void uf_pt_attach(uf_pt *pt, int uffd, int kick_fd, int wp, uf_budget *budget)
{
	pthread_mutex_lock(&pt->lock);
	pt->uffd = uffd;
	pt->kick_fd = kick_fd;
	pt->wp = wp;
	pt->budget = budget;
	pthread_mutex_unlock(&pt->lock);
}

void uf_pt_bind(uf_pt *pt, int uffd, int kick_fd)
{
	pthread_mutex_lock(&pt->lock);
	pt->uffd = uffd;
	pt->kick_fd = kick_fd;
	pthread_mutex_unlock(&pt->lock);
}

/* The engine of uffd is going away: a table that outlives it (held by an eviction in
 * flight, or by a parent's list of children forked during a batch) must not use the fd
 * numbers any more - they may soon belong to something else. */
void uf_pt_unbind(uf_pt *pt, int uffd)
{
	pthread_mutex_lock(&pt->lock);
	if (pt->uffd == uffd) {
		pt->uffd = -1;
		pt->kick_fd = -1;
	}
	pthread_mutex_unlock(&pt->lock);
}

void uf_pt_exempt(uf_pt *pt, uint32_t tid)
{
	pthread_mutex_lock(&pt->lock);
	pt->exempt_tid = tid;
	pthread_mutex_unlock(&pt->lock);
}

static void kick(uf_pt *pt)
{
	uint64_t one = 1;
	if (pt->kick_fd >= 0 && write(pt->kick_fd, &one, sizeof(one)) < 0) {
		/* EAGAIN: a kick is pending already */
	}
}

void uf_pt_tick(uf_pt *pt)
{
	pthread_mutex_lock(&pt->lock);
	pt->epoch++;
	if (!pt->epoch)
		pt->epoch = 1;
	pthread_mutex_unlock(&pt->lock);
}

void uf_pt_get_stats(uf_pt *pt, struct uf_pt_stats *out)
{
	pthread_mutex_lock(&pt->lock);
	*out = pt->st;
	out->pages_clean = pt->counts[UF_PG_CLEAN];
	out->pages_transit = pt->counts[UF_PG_TRANSIT];
	out->pages_evicted = pt->counts[UF_PG_EVICTED];
	out->pages_zero = pt->counts[UF_PG_ZERO];
	out->table_bytes = pt->nleaves * LEAF_N * sizeof(uint64_t) + pt->ntab * sizeof(struct leafslot);
	out->epoch = pt->epoch;
	out->readahead_window = pt->ra_window;
	pthread_mutex_unlock(&pt->lock);
}

int uf_pt_state(uf_pt *pt, uint64_t addr, uint64_t *slot_out)
{
	uint64_t v;

	pthread_mutex_lock(&pt->lock);
	v = ent_get(pt, addr);
	pthread_mutex_unlock(&pt->lock);
	if (slot_out)
		*slot_out = E_SLOT(v);
	return E_STATE(v) | ((v & E_DROPPED) ? 0x10 : 0);
}

/* Copy pt into the new, empty table c (pt->lock held): its entries (their store
 * references counted), and the batch in flight - c becomes one of pt's kids, which the
 * batch's commit decides alike - with the copy-backs kept for it (pages whose put failed
 * and whose install met EAGAIN: TRANSIT in both, installed in c once it has a uffd).
 * 0 or -ENOMEM (c is then for the caller to drop). */
static int clone_locked(uf_pt *pt, uf_pt *c)
{
	size_t i, j;

	c->epoch = pt->epoch;
	c->wp = pt->wp;
	c->budget = pt->budget;
	if (pt->ntab) {
		c->tab = calloc(pt->ntab, sizeof(*c->tab));
		if (!c->tab)
			return -ENOMEM;
		c->ntab = pt->ntab;
	}
	st_lock(pt->store);
	for (i = 0; i < pt->ntab; i++) {
		if (!pt->tab[i].key)
			continue;
		c->tab[i].ents = leaf_new(c, pt->tab[i].key);
		if (!c->tab[i].ents) {
			st_unlock(pt->store);
			return -ENOMEM;
		}
		c->tab[i].key = pt->tab[i].key;
		memcpy(c->tab[i].ents, pt->tab[i].ents, LEAF_N * sizeof(uint64_t));
		c->nleaves++;
		for (j = 0; j < LEAF_N; j++)
			slot_get_ref(pt->store, E_SLOT(c->tab[i].ents[j]));
	}
	st_unlock(pt->store);
	memcpy(c->counts, pt->counts, sizeof(c->counts));
	for (i = 0; i < pt->ncb; i++)
		if (defer_copyback(c, pt->cb[i].addr, pt->cb[i].data) < 0)
			return -ENOMEM;
	if (pt->batch) {
		uf_pt **nk = realloc(pt->kids, (pt->nkids + 1) * sizeof(*nk));
		c->runs = malloc((pt->nruns ? pt->nruns : 1) * 2 * sizeof(uint64_t));
		c->log = malloc((pt->nlog ? pt->nlog : 1) * sizeof(struct remap));
		if (nk)
			pt->kids = nk;
		if (!nk || !c->runs || !c->log)
			return -ENOMEM;
		memcpy(c->runs, pt->runs, pt->nruns * 2 * sizeof(uint64_t));
		c->nruns = c->capruns = pt->nruns;
		memcpy(c->log, pt->log, pt->nlog * sizeof(struct remap));
		c->nlog = c->caplog = pt->nlog;
		c->batch = 1;
		persist_batch(c, pt->th->scratch);
		pt->kids[pt->nkids++] = uf_pt_ref(c);
	}
	return 0;
}

/* Copy of the table for a forked child, taken now.  The engine takes its children's
 * copies as it reads (uf_pt_read) and calls this only when that copy failed, or when the
 * FORK was read before it had a table.  Every slot gains a reference. */
uf_pt *uf_pt_clone(uf_pt *pt)
{
	int err;
	uf_pt *c = uf_pt_new(pt->store, &err);

	if (!c)
		return NULL;
	pthread_mutex_lock(&pt->lock);
	err = clone_locked(pt, c);
	pthread_mutex_unlock(&pt->lock);
	if (err) {
		uf_pt_unref(c);
		return NULL;
	}
	return c;
}

/* Read messages from the uffd with the table locked, and copy the table for each FORK
 * among them before the lock is let go (clones[i]: the i-th FORK's copy, NULL if it
 * failed; *nclones of them).
 *
 * Why here and not when the engine reaches the FORK message: the kernel copies the
 * parent's page tables into the child before it queues FORK, and from the start of that
 * copy until the FORK is read every UFFDIO_COPY, ZEROPAGE, MOVE and WRITEPROTECT on the
 * parent's uffd fails with EAGAIN (mmap_changing).  Every change that makes a page
 * present is made with this lock held, together with the entry it changes (installs,
 * copy-backs, fill_all).  So a change made before this read is in the child's memory,
 * and one made after it is not - and must not be in the child's table.  A copy taken
 * later would have the pages installed for the faults that came before the FORK in the
 * same read (a read returns faults before events): the child has no such page, and its
 * table would call it resident - a write fault's page is NONE after the install, so the
 * child would read zeros where its data is in the store.  The events before a FORK in
 * the same read are applied to its copy by the engine, in order (rules_event).
 * Returns the bytes read, or -errno (-EAGAIN: nothing to read). */
ssize_t uf_pt_read(uf_pt *pt, int fd, void *buf, size_t len, uf_pt **clones, size_t maxclones,
		   size_t *nclones)
{
	const struct uf_msg *m = buf;
	ssize_t n;
	size_t i;

	*nclones = 0;
	pthread_mutex_lock(&pt->lock);
	n = read(fd, buf, len);
	if (n < 0)
		n = -errno;
	for (i = 0; n > 0 && i < (size_t)n / sizeof(*m); i++) {
		int err;
		uf_pt *c;
		if (m[i].event != UFFD_EVENT_FORK || *nclones == maxclones)
			continue;
		c = uf_pt_new(pt->store, &err);
		if (c && clone_locked(pt, c) < 0) {
			uf_pt_unref(c);
			c = NULL;
		}
		clones[(*nclones)++] = c;
	}
	pthread_mutex_unlock(&pt->lock);
	return n;
}

/* ---- events (engine thread, in message order) ---------------------------------- */

static void drop_range(uf_pt *pt, uint64_t start, uint64_t end)
{
	uint64_t a;

	for (a = start; a < end; a += PG) {
		uint64_t *e = ent_at(pt, a, 0);
		if (!e) {
			a = ((a / PG) | (LEAF_N - 1)) * PG; /* skip the rest of a missing leaf */
			continue;
		}
		if (!*e)
			continue;
		if (E_STATE(*e) == UF_PG_TRANSIT) {
			/* the batch decides it; the data must not come back */
			ent_swap(pt, e, E_MAKE(0, UF_PG_TRANSIT, E_STAMP(*e)) | E_DROPPED);
			continue;
		}
		ent_swap(pt, e, 0);
	}
}

void uf_pt_event(uf_pt *pt, const struct uf_msg *m)
{
	pthread_mutex_lock(&pt->lock);
	switch (m->event) {
	case UFFD_EVENT_REMOVE:
	case UFFD_EVENT_UNMAP:
		drop_range(pt, m->a & ~(PG - 1), m->b);
		break;
	case UFFD_EVENT_REMAP: { /* a = from, b = to, c = len */
		uint64_t n = m->c / PG, i, *tmp;
		if (m->a + m->c <= m->b || m->b + m->c <= m->a) {
			/* apart (mremap moves do not overlap): each entry is written at the
			 * destination before it leaves the source, its reference taken first and
			 * dropped last - a manager killed in between leaves a reference too many,
			 * never an entry lost or naming a freed blob (the stale source entry is
			 * outside any mapping: uf_pt_recover drops it) */
			struct pt_head *h = pt->th;
			h->remap_from = m->a;
			h->remap_to = m->b;
			h->remap_phase = 1;
			__atomic_store_n(&h->remap_len, m->c, __ATOMIC_RELEASE);
			drop_range(pt, m->b, m->b + m->c); /* the kernel unmapped what was there */
			__atomic_store_n(&h->remap_phase, 2, __ATOMIC_RELEASE);
			for (i = 0; i < n; i++) {
				uint64_t *e = ent_at(pt, m->a + i * PG, 0), v = e ? *e : 0;
				if (!v)
					continue;
				st_lock(pt->store);
				slot_get_ref(pt->store, E_SLOT(v));
				st_unlock(pt->store);
				if (ent_put(pt, m->b + i * PG, v) == 0)
					ent_set(pt, e, 0);
				pt_drop_handle(pt, E_SLOT(v));
			}
			__atomic_store_n(&h->remap_len, 0, __ATOMIC_RELEASE);
			goto remap_logged;
		}
		tmp = malloc((n ? n : 1) * sizeof(uint64_t));
		if (!tmp)
			break; /* cannot happen in practice; entries stay (faults would go to Python) */
		for (i = 0; i < n; i++) {
			uint64_t *e = ent_at(pt, m->a + i * PG, 0);
			tmp[i] = e ? *e : 0;
			if (e && *e)
				ent_set(pt, e, 0);
		}
		/* whatever was at the destination was unmapped by the kernel */
		drop_range(pt, m->b, m->b + m->c);
		for (i = 0; i < n; i++)
			if (tmp[i])
				ent_put(pt, m->b + i * PG, tmp[i]);
		free(tmp);
	remap_logged:
		if (pt->batch) {
			if (pt->nlog == pt->caplog) {
				size_t nc = pt->caplog ? pt->caplog * 2 : 8;
				struct remap *nl = realloc(pt->log, nc * sizeof(*nl));
				if (nl) {
					pt->log = nl;
					pt->caplog = nc;
				}
			}
			if (pt->nlog < pt->caplog) {
				pt->log[pt->nlog++] = (struct remap){ m->a, m->b, m->c };
				if (pt->nlog <= PT_LOG_MAX) {
					PT_LOG(pt)[pt->nlog - 1] = pt->log[pt->nlog - 1];
					__atomic_store_n(&pt->th->nlog, pt->nlog, __ATOMIC_RELEASE);
				} else {
					pt->th->unknown = 1;
				}
			} else {
				pt->th->unknown = 1; /* (no memory for the log: the batch is lost anyway) */
			}
		}
		break;
	}
	default:
		break;
	}
	pthread_mutex_unlock(&pt->lock);
}

/* ---- eviction: begin, which pages need reading, commit ------------------------- */

/* Write the batch in flight into the memfd (lock held): the runs and remaps first,
 * the count last, so that a manager taking over finds either no batch or all of it. */
static void persist_batch(uf_pt *pt, uint64_t scratch)
{
	struct pt_head *h = pt->th;

	__atomic_store_n(&h->nruns, 0, __ATOMIC_RELEASE);
	if (!pt->batch)
		return;
	h->unknown = pt->nruns > PT_RUNS_MAX || pt->nlog > PT_LOG_MAX;
	if (!h->unknown) {
		memcpy(PT_RUNS(pt), pt->runs, pt->nruns * 2 * sizeof(uint64_t));
		memcpy(PT_LOG(pt), pt->log, pt->nlog * sizeof(struct remap));
	}
	h->nlog = pt->nlog;
	h->scratch = scratch;
	__atomic_store_n(&h->nruns, h->unknown ? 1 : pt->nruns, __ATOMIC_RELEASE);
}

/* Mark the pages of `ranges` ((start, len) pairs) that are resident in our books
 * (NONE or CLEAN) as TRANSIT, up to max_pages, and return the marked runs as
 * (start, len) pairs in runs_out.  Returns the number of runs, or -errno. */
int64_t uf_pt_begin(uf_pt *pt, const uint64_t *ranges, size_t nranges, uint64_t max_pages,
		    uint64_t *runs_out, size_t max_runs)
{
	size_t i, nr = 0;
	uint64_t taken = 0;
	int64_t rc = 0;

	pthread_mutex_lock(&pt->lock);
	if (pt->batch) {
		pthread_mutex_unlock(&pt->lock);
		return -EBUSY;
	}
	for (i = 0; i < nranges && taken < max_pages; i++) {
		uint64_t a = ranges[2 * i] & ~(PG - 1), end = ranges[2 * i] + ranges[2 * i + 1];
		for (; a < end && taken < max_pages; a += PG) {
			uint64_t *e = ent_at(pt, a, 1), v;
			int s;
			if (!e) {
				rc = -ENOMEM;
				goto out;
			}
			v = *e;
			s = E_STATE(v);
			if (s != UF_PG_NONE && s != UF_PG_CLEAN)
				continue;
			if (!v)
				pt->counts[UF_PG_NONE]++;
			ent_set(pt, e, E_MAKE(E_SLOT(v), UF_PG_TRANSIT, E_STAMP(v)));
			taken++;
			if (nr && runs_out[2 * (nr - 1)] + runs_out[2 * (nr - 1) + 1] == a) {
				runs_out[2 * (nr - 1) + 1] += PG;
			} else {
				if (nr == max_runs) {
					/* no room for another run: give this page back */
					ent_set(pt, e, v);
					if (!v)
						pt->counts[UF_PG_NONE]--;
					taken--;
					goto out;
				}
				runs_out[2 * nr] = a;
				runs_out[2 * nr + 1] = PG;
				nr++;
			}
		}
	}
out:
	if (nr) {
		if (pt->capruns < nr) {
			uint64_t *n2 = realloc(pt->runs, nr * 2 * sizeof(uint64_t));
			if (!n2) {
				rc = -ENOMEM;
			} else {
				pt->runs = n2;
				pt->capruns = nr;
			}
		}
		if (rc == 0) {
			memcpy(pt->runs, runs_out, nr * 2 * sizeof(uint64_t));
			pt->nruns = nr;
			pt->nlog = 0;
			pt->batch = 1;
			persist_batch(pt, 0);
		}
	}
	if (rc < 0 && nr) { /* undo */
		size_t k;
		uint64_t a;
		for (k = 0; k < nr; k++)
			for (a = runs_out[2 * k]; a < runs_out[2 * k] + runs_out[2 * k + 1]; a += PG) {
				uint64_t *e = ent_at(pt, a, 0);
				ent_set(pt, e, E_MAKE(E_SLOT(*e), E_SLOT(*e) ? UF_PG_CLEAN : UF_PG_NONE, E_STAMP(*e)));
			}
		nr = 0;
	}
	pthread_mutex_unlock(&pt->lock);
	return rc < 0 ? rc : (int64_t)nr;
}

/* Where the page that was at addr when the batch began is now: the remaps since,
 * in order; 0 when one of them unmapped it (it sat where a remap put another range). */
static uint64_t translate(const uf_pt *pt, uint64_t addr)
{
	size_t i;

	for (i = 0; i < pt->nlog; i++) {
		const struct remap *r = &pt->log[i];
		if (addr >= r->from && addr < r->from + r->len)
			addr = addr - r->from + r->to;
		else if (addr >= r->to && addr < r->to + r->len)
			return 0;
	}
	return addr;
}

/* The batch position (page index) of each page, by walking the runs. */
#define FOR_BATCH_PAGES(pt, idx, addr)                                                   \
	for (size_t _r = 0, idx = 0; _r < (pt)->nruns; _r++)                             \
		for (uint64_t addr = (pt)->runs[2 * _r];                                 \
		     addr < (pt)->runs[2 * _r] + (pt)->runs[2 * _r + 1]; addr += PG, idx++)

static int in_pairs(const uint64_t *pairs, size_t n, uint64_t off)
{
	size_t lo = 0, hi = n;
	while (lo < hi) { /* pairs are sorted by offset and do not overlap */
		size_t mid = (lo + hi) / 2;
		if (pairs[2 * mid] + pairs[2 * mid + 1] <= off)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < n && pairs[2 * lo] <= off && off < pairs[2 * lo] + pairs[2 * lo + 1];
}

/* Of the batch offsets in `present` ((offset, len) pairs, sorted), those whose page
 * must be read: TRANSIT without a valid store copy.  Returns pairs in out. */
int64_t uf_pt_need_read(uf_pt *pt, const uint64_t *present, size_t npresent, uint64_t *out, size_t max_out)
{
	size_t n = 0;

	pthread_mutex_lock(&pt->lock);
	FOR_BATCH_PAGES(pt, idx, addr) {
		uint64_t off = idx * PG, v;
		if (!in_pairs(present, npresent, off))
			continue;
		v = ent_get(pt, translate(pt, addr));
		if (E_STATE(v) == UF_PG_TRANSIT && E_SLOT(v) && !(v & E_DROPPED))
			continue; /* clean: the store has it */
		if (n && out[2 * (n - 1)] + out[2 * (n - 1) + 1] == off) {
			out[2 * (n - 1) + 1] += PG;
		} else if (n < max_out) {
			out[2 * n] = off;
			out[2 * n + 1] = PG;
			n++;
		} else {
			pthread_mutex_unlock(&pt->lock);
			return -E2BIG;
		}
	}
	pthread_mutex_unlock(&pt->lock);
	return (int64_t)n;
}

static int is_zero(const void *p)
{
	const uint64_t *w = p;
	size_t i;
	for (i = 0; i < PG / 8; i += 4)
		if (w[i] | w[i + 1] | w[i + 2] | w[i + 3])
			return 0;
	return 1;
}

enum { OUT_RESTORE = 0, OUT_EVICTED = 1, OUT_ZERO = 2, OUT_NONE = 3 };

/* Apply one page's outcome to a table (lock held). */
static void apply(uf_pt *pt, uint64_t addr, int out, uint64_t slot, const void *data,
		  struct uf_commit *res, int own)
{
	uint64_t *e = ent_at(pt, translate(pt, addr), 0), v;

	/* Not TRANSIT any more: an event after the MOVE replaced the mapping (a remap onto
	 * it); what we took belonged to the mapping that is gone - it is dropped.  (The
	 * page we took was the one the table described: the MOVE ran under a hold, see
	 * uf_pt_batch_triples.) */
	if (!e || E_STATE(*e) != UF_PG_TRANSIT) {
		if (own && out != OUT_RESTORE)
			res->dropped++;
		return;
	}
	v = *e;
	if (v & E_DROPPED) {
		ent_set(pt, e, 0);
		if (own)
			res->dropped++;
		return;
	}
	if (!own && E_SLOT(v) && (out == OUT_NONE || out == OUT_ZERO)) {
		/* a table forked from the batch whose copy of the page is clean (its store copy
		 * is its data) while the batch's own table has nothing for it: the program
		 * discarded the page after the fork, which the child did not - it keeps it */
		out = OUT_EVICTED;
		slot = E_SLOT(v);
	}
	switch (out) {
	case OUT_RESTORE:
		ent_set(pt, e, E_MAKE(E_SLOT(v), E_SLOT(v) ? UF_PG_CLEAN : UF_PG_NONE, E_STAMP(v)));
		if (own)
			res->kept++;
		break;
	case OUT_EVICTED:
		if (E_SLOT(v) != slot) {
			st_lock(pt->store);
			slot_get_ref(pt->store, slot);
			st_unlock(pt->store);
		}
		ent_swap(pt, e, E_MAKE(slot, UF_PG_EVICTED, E_STAMP(v)));
		break;
	case OUT_ZERO:
		ent_swap(pt, e, E_MAKE(0, UF_PG_ZERO, E_STAMP(v)));
		break;
	case OUT_NONE:
		ent_swap(pt, e, E_MAKE(0, UF_PG_NONE, E_STAMP(v)));
		break;
	}
}

/* Decide every page of the batch.  moved: batch (offset, len) pairs the agent moved
 * into scratch; read: the pairs whose bytes are now in buf at the same offsets.
 * Pages moved but neither read nor clean were holes.  Pages whose store put fails
 * are installed back from buf (the eviction of those pages is aborted; nothing is
 * lost) and res->put_error says why.  Faults waiting on the batch are then woken. */
/* The batch offsets of pages to put: read, TRANSIT without a store copy, not all zeros,
 * not dropped - unless tables were forked from the batch: a page the program discarded
 * after the fork is gone for it, not for the child, whose only copy of it is this one
 * (lock held).  Returns how many. */
static size_t pages_to_put(uf_pt *pt, const uint64_t *read, size_t nread, uint64_t buf, uint64_t *putoff,
			   size_t max)
{
	size_t nput = 0;

	FOR_BATCH_PAGES(pt, idx, addr) {
		uint64_t off = idx * PG, v = ent_get(pt, translate(pt, addr));
		if (!in_pairs(read, nread, off) || E_STATE(v) != UF_PG_TRANSIT)
			continue;
		if ((v & E_DROPPED) && !pt->nkids)
			continue;
		if (E_SLOT(v))
			continue;
		if (is_zero((void *)(uintptr_t)(buf + off)))
			continue;
		if (nput < max)
			putoff[nput++] = off;
	}
	return nput;
}

static int commit_core(uf_pt *pt, const uint64_t *moved, size_t nmoved, const uint64_t *read, size_t nread,
		       uint64_t buf, const uint64_t *putoff, const uint64_t *slots, size_t nput, int64_t stored,
		       int rc, struct uf_commit *res);

/* Keep a copy of a page whose copy-back met EAGAIN (pt->lock held); 0 or -ENOMEM. */
static int defer_copyback(uf_pt *pt, uint64_t addr, const void *data)
{
	char *d;

	if (pt->ncb == pt->capcb) {
		size_t nc = pt->capcb ? pt->capcb * 2 : 64;
		struct copyback *n2 = realloc(pt->cb, nc * sizeof(*n2));
		if (!n2)
			return -ENOMEM;
		pt->cb = n2;
		pt->capcb = nc;
	}
	if (!(d = malloc(PG)))
		return -ENOMEM;
	memcpy(d, data, PG);
	pt->cb[pt->ncb].addr = addr;
	pt->cb[pt->ncb].data = d;
	pt->cb[pt->ncb].failed = 0;
	pt->ncb++;
	return 0;
}

/* Install the deferred copy-backs (pt->lock NOT held on entry), trying for up to
 * wait_ms: each is tried with the lock held - so that an event (REMOVE, UNMAP) cannot be
 * applied between the check of its entry and the copy - and the lock is dropped between
 * rounds so that the engine can read the pending events that make UFFDIO_COPY return
 * EAGAIN.  A page still TRANSIT and not dropped is copied in and becomes NONE; a dropped
 * or remapped one is let go (the program discarded it, or the mapping is gone); either
 * way its threads are woken.  What cannot be installed yet (EAGAIN: events nobody has
 * read - the engine may be held, or stopped; ENOMEM) stays kept, TRANSIT - its threads
 * wait rather than read zeros - and is tried again by uf_pt_settle, which the manager
 * calls every round.  Never blocks longer than wait_ms: a caller on the event loop (or
 * committing a parent's batch for a fork child whose engine is held) passes 0.
 * Returns how many copy-backs are still kept. */
static size_t finish_copybacks(uf_pt *pt, unsigned wait_ms)
{
	uint64_t deadline = mono_ns() + (uint64_t)wait_ms * 1000000u;
	size_t left;

	pthread_mutex_lock(&pt->lock);
	for (;;) {
		size_t i = pt->ncb;
		while (pt->uffd >= 0 && i-- > 0) { /* (no uffd yet: a fork child's, later) */
			uint64_t addr = pt->cb[i].addr, *e = ent_at(pt, addr, 0), done = 0;
			int r = -ENOENT, ours = e && E_STATE(*e) == UF_PG_TRANSIT && !(*e & E_DROPPED);
			if (ours)
				r = uf_copy_all(pt->uffd, addr, (uint64_t)(uintptr_t)pt->cb[i].data, PG,
						UFFDIO_COPY_MODE_DONTWAKE, &done);
			if (r == -EAGAIN || r == -ENOMEM) {
				if (r == -ENOMEM && !pt->cb[i].failed) {
					pt->cb[i].failed = 1;
					pt->st.store_errors++;
				}
				continue; /* kept: tried again */
			}
			if (ours) {
				if (r < 0 && r != -EEXIST && r != -ENOENT && r != -ESRCH)
					pt->st.store_errors++; /* not installed, and never will be: it stays
								* TRANSIT, its threads wait rather than read
								* zeros */
				else
					ent_set(pt, e, E_MAKE(0, UF_PG_NONE, E_STAMP(*e)));
			}
			free(pt->cb[i].data);
			pt->cb[i] = pt->cb[--pt->ncb];
			uf_wake(pt->uffd, addr, PG);
		}
		if (!pt->ncb || pt->uffd < 0 || mono_ns() >= deadline)
			break;
		pthread_mutex_unlock(&pt->lock);
		usleep(200); /* the engine drains the events */
		pthread_mutex_lock(&pt->lock);
	}
	left = pt->ncb;
	pthread_mutex_unlock(&pt->lock);
	return left;
}

/* Install the copy-backs kept for this table: a fork child's, before it had a uffd, or
 * ones that met pending events.  Never waits.  Returns how many are still kept. */
int64_t uf_pt_settle(uf_pt *pt)
{
	return (int64_t)finish_copybacks(pt, 0);
}

int uf_pt_commit(uf_pt *pt, const uint64_t *moved, size_t nmoved, const uint64_t *read, size_t nread,
		 uint64_t buf, struct uf_commit *res)
{
	uint64_t *slots = NULL;
	int64_t stored = 0;
	size_t i, npages = 0, nput = 0;
	uint64_t *putoff = NULL, t0, t1;
	int rc = 0;

	memset(res, 0, sizeof(*res));
	pthread_mutex_lock(&pt->lock);
	if (!pt->batch) {
		pthread_mutex_unlock(&pt->lock);
		return -EINVAL;
	}
	for (i = 0; i < pt->nruns; i++)
		npages += pt->runs[2 * i + 1] / PG;
	slots = calloc(npages ? npages : 1, sizeof(*slots));
	putoff = calloc(npages ? npages : 1, sizeof(*putoff));
	if (!slots || !putoff)
		rc = -ENOMEM; /* everything is restored */
	else if (pt->store->kind == UF_STORE_EXTERNAL && nread)
		rc = -EINVAL; /* an external store's pages are put by its owner: commit_external */
	/* 1. pages to put, gathered contiguously */
	if (rc == 0)
		nput = pages_to_put(pt, read, nread, buf, putoff, npages);
	t0 = mono_ns();
	if (nput) {
		/* straight from the staging buffer (page aligned: O_DIRECT works) */
		stored = store_put_pages(pt->store, (const char *)(uintptr_t)buf, putoff, nput, slots);
		if (stored < 0) {
			res->put_error = (int)stored;
			stored = 0;
		} else if ((size_t)stored < nput) {
			/* the rest failed; find out why from a one-page retry */
			uint64_t dummy;
			int64_t r2 = uf_store_put(pt->store, (void *)(uintptr_t)(buf + putoff[stored]), 1, &dummy);
			if (r2 == 1) {
				uf_store_unref(pt->store, dummy);
				res->put_error = -ENOMEM;
			} else {
				res->put_error = (int)(r2 < 0 ? r2 : -EIO);
			}
		}
	}
	t1 = mono_ns();
	rc = commit_core(pt, moved, nmoved, read, nread, buf, putoff, slots, nput, stored, rc, res);
	/* (a worker thread's commit waits a moment for pending events; an empty one - the
	 * event loop's, after an error - never waits: uf_pt_settle tries again) */
	finish_copybacks(pt, nmoved || nread ? 20 : 0);
	free(slots);
	free(putoff);
	__atomic_fetch_add(&pt->st.ns_put, t1 - t0, __ATOMIC_RELAXED);
	__atomic_fetch_add(&pt->st.ns_commit, mono_ns() - t1, __ATOMIC_RELAXED);
	return rc;
}

/* External stores (written by their owner, e.g. in Python): after uf_pt_collect
 * returned 1, the pages to put are named by uf_pt_pending_put; the owner stores them and
 * commits with the handles it got (nstored of nput; put_error if fewer). */
int64_t uf_pt_pending_put(uf_pt *pt, uint64_t buf, uint64_t *putoff, size_t max)
{
	size_t n;

	pthread_mutex_lock(&pt->lock);
	if (!pt->batch || !pt->pend_ok) {
		pthread_mutex_unlock(&pt->lock);
		return -EINVAL;
	}
	n = pages_to_put(pt, pt->pend_read, pt->pend_nread, buf, putoff, max);
	pthread_mutex_unlock(&pt->lock);
	return (int64_t)n;
}

int uf_pt_commit_external(uf_pt *pt, uint64_t buf, const uint64_t *putoff, const uint64_t *keys,
			  size_t nput, size_t nstored, int put_error, struct uf_commit *res)
{
	uint64_t *mo, *rd, *hs;
	size_t nmo, nrd, i;
	int rc;

	memset(res, 0, sizeof(*res));
	pthread_mutex_lock(&pt->lock);
	if (!pt->batch) {
		pthread_mutex_unlock(&pt->lock);
		return -EINVAL;
	}
	mo = pt->pend_moved;
	rd = pt->pend_read;
	nmo = pt->pend_ok ? pt->pend_nmoved : 0;
	nrd = pt->pend_ok ? pt->pend_nread : 0;
	pt->pend_moved = pt->pend_read = NULL;
	pt->pend_ok = 0;
	res->put_error = put_error;
	/* the owner's keys become handles with one reference each (the put's) */
	hs = calloc(nput ? nput : 1, sizeof(*hs));
	if (!hs) {
		nstored = 0;
		rc = -ENOMEM;
	}
	for (i = 0; hs && i < nstored; i++) {
		if (uf_store_external_add(pt->store, keys[i]) < 0) {
			nstored = i; /* a bad key: this page and the rest stay resident */
			res->put_error = -EINVAL;
			break;
		}
		hs[i] = keys[i] << 4;
	}
	rc = commit_core(pt, mo ? mo : putoff, nmo, rd ? rd : putoff, nrd, buf, putoff, hs ? hs : putoff, nput,
			 (int64_t)nstored, hs ? 0 : -ENOMEM, res);
	finish_copybacks(pt, 0); /* (on the event loop: never waits) */
	free(hs);
	free(mo);
	free(rd);
	return rc;
}

/* Steps 2 and 3 of a commit (pt->lock held on entry, released on return). */
/* A page whose put failed, for a table forked from this batch after its MOVE (the
 * child's copy of the page is a hole too, its faults wait): copied into the child's
 * uffd, or kept until the child has one (uf_pt_settle) or its events are read
 * (EAGAIN, ENOMEM).  Returns 1 when the page is dealt with, 0 when apply() decides (it
 * is not TRANSIT there, or dropped, or its mapping is gone).  Lock of k held. */
static int kid_copyback(uf_pt *k, uint64_t addr, const void *data, struct uf_commit *res)
{
	uint64_t a = translate(k, addr), *e = a ? ent_at(k, a, 0) : NULL, done = 0;
	int r;

	if (!e || E_STATE(*e) != UF_PG_TRANSIT || (*e & E_DROPPED))
		return 0;
	r = k->uffd >= 0 ? uf_copy_all(k->uffd, a, (uint64_t)(uintptr_t)data, PG, UFFDIO_COPY_MODE_DONTWAKE, &done)
			 : -EAGAIN;
	if (r == 0 || r == -EEXIST) {
		ent_set(k, e, E_MAKE(0, UF_PG_NONE, E_STAMP(*e)));
		if (k->uffd >= 0)
			uf_wake(k->uffd, a, PG);
		return 1;
	}
	if (r == -ENOENT || r == -ESRCH)
		return 0; /* the mapping, or the child, is gone */
	if ((r == -EAGAIN || r == -ENOMEM) && defer_copyback(k, a, data) == 0)
		return 1; /* stays TRANSIT until finish_copybacks */
	/* not installed (and no memory to keep it): it stays TRANSIT - its threads wait
	 * rather than read zeros */
	res->lost_errno = r;
	return 1;
}

/* Apply one page's outcome to every table forked while the batch was in flight - and
 * to theirs: a fork of a fork copies the batch too (each translates the batch address
 * with its own remaps).  copyback: the page's data when its put failed (the children
 * get it back like the parent).  Lock of pt held. */
static void settle_kids(uf_pt *pt, uint64_t addr, int out, uint64_t slot, const void *copyback,
			struct uf_commit *res)
{
	size_t i;

	for (i = 0; i < pt->nkids; i++) {
		uf_pt *k = pt->kids[i];
		pthread_mutex_lock(&k->lock);
		if (!copyback || !kid_copyback(k, addr, copyback, res))
			apply(k, addr, out, slot, NULL, res, 0);
		settle_kids(k, addr, out, slot, copyback, res);
		pthread_mutex_unlock(&k->lock);
	}
}

/* Close the batch in every table forked from it, children of children too, and hand
 * them over (their references) as one list.  Lock of pt held. */
static uf_pt **take_kids(uf_pt *pt, size_t *n)
{
	uf_pt **all = NULL;
	size_t cnt = 0, cap = 0, i;

	*n = 0;
	for (i = 0; i < pt->nkids; i++) { /* a breadth-first walk: `all` grows as it goes */
		if (cnt == cap) {
			size_t nc = cap ? cap * 2 : 8;
			uf_pt **a2 = realloc(all, nc * sizeof(*a2));
			if (!a2)
				break; /* (cannot happen in practice: those stay in pt->kids) */
			all = a2;
			cap = nc;
		}
		all[cnt++] = pt->kids[i];
	}
	if (i < pt->nkids) {
		free(all);
		return NULL;
	}
	pt->nkids = 0;
	for (i = 0; i < cnt; i++) {
		uf_pt *k = all[i];
		size_t j;
		pthread_mutex_lock(&k->lock);
		k->batch = 0;
		k->nlog = 0;
		persist_batch(k, 0);
		for (j = 0; j < k->nkids; j++) {
			if (cnt == cap) {
				size_t nc = cap * 2;
				uf_pt **a2 = realloc(all, nc * sizeof(*a2));
				if (!a2)
					break;
				all = a2;
				cap = nc;
			}
			all[cnt++] = k->kids[j];
		}
		if (j == k->nkids)
			k->nkids = 0;
		pthread_mutex_unlock(&k->lock);
	}
	*n = cnt;
	return all;
}

static int commit_core(uf_pt *pt, const uint64_t *moved, size_t nmoved, const uint64_t *read, size_t nread,
		       uint64_t buf, const uint64_t *putoff, const uint64_t *slots, size_t nput, int64_t stored,
		       int rc, struct uf_commit *res)
{
	size_t i, k, nk = 0;
	uf_pt **kids;

	/* 2. decide every page, in this table and in children forked meanwhile */
	k = 0;
	FOR_BATCH_PAGES(pt, idx, addr) {
		uint64_t off = idx * PG, v = ent_get(pt, translate(pt, addr));
		const void *data = NULL;
		int out = OUT_RESTORE, wasread = in_pairs(read, nread, off), own = 1;
		uint64_t slot = 0;
		if (wasread)
			data = (void *)(uintptr_t)(buf + off);
		int is_put = k < nput && putoff[k] == off;
		if (is_put)
			k++; /* whatever the branch below: the put list advances with the batch */
		if (rc < 0) {
			out = OUT_RESTORE;
		} else if (!in_pairs(moved, nmoved, off)) {
			out = OUT_RESTORE; /* the kernel refused (shared, pinned) or it vanished */
		} else if (E_STATE(v) == UF_PG_TRANSIT && E_SLOT(v) && !(v & E_DROPPED)) {
			out = OUT_EVICTED; /* clean: evicted without reading or writing */
			slot = E_SLOT(v);
			res->clean++;
		} else if (is_put) {
			if (k - 1 < (size_t)stored) {
				out = OUT_EVICTED;
				slot = slots[k - 1];
				res->stored++;
			} else if (!(v & E_DROPPED) && E_STATE(v) == UF_PG_TRANSIT) {
				/* the store failed: the page goes back (it is missing in the target and
				 * its faults are parked, so the copy cannot race a fault); a dropped one
				 * (discarded by the program meanwhile) must not come back */
				uint64_t done = 0;
				int r = pt->uffd >= 0 ? uf_copy_all(pt->uffd, translate(pt, addr),
								    (uint64_t)(uintptr_t)data, PG,
								    UFFDIO_COPY_MODE_DONTWAKE, &done)
						      : -EAGAIN; /* (unbound: kept) */
				out = OUT_NONE;
				if (r < 0 && r != -ENOENT && r != -ESRCH && r != -EEXIST) {
					/* not installed now: it stays TRANSIT (its faults wait, never a
					 * zero page) and finish_copybacks or uf_pt_settle installs it */
					own = 0;
					if ((r != -EAGAIN && r != -ENOMEM) ||
					    defer_copyback(pt, translate(pt, addr), data) < 0)
						res->lost_errno = r;
				}
				res->failed++;
			} else {
				out = OUT_NONE;
			}
		} else if (wasread) {
			out = OUT_ZERO;
			res->zero++;
		} else {
			out = OUT_NONE; /* a hole: never touched */
			res->holes++;
		}
		if (out == OUT_EVICTED || out == OUT_ZERO)
			res->evicted++;
		if (own)
			apply(pt, addr, out, slot, data, res, 1);
		settle_kids(pt, addr, out, slot, is_put && out == OUT_NONE ? data : NULL, res);
	}
	/* the new slots carry one reference from the put; apply() took one per table */
	st_lock(pt->store);
	for (k = 0; k < (size_t)stored; k++)
		slot_put_ref(pt->store, slots[k]);
	st_unlock(pt->store);
	pt->st.pages_out += res->evicted;
	pt->st.pages_out_clean += res->clean;
	pt->st.pages_out_zero += res->zero;
	pt->st.put_failures += res->failed;
	budget_add(pt->budget, -(int64_t)res->evicted);
	pt->batch = 0;
	pt->nlog = 0;
	persist_batch(pt, 0);
	kids = take_kids(pt, &nk);
	pthread_mutex_unlock(&pt->lock);
	if (res->failed && pt->uffd >= 0) /* wake the threads of pages copied back */
		for (i = 0; i < pt->nruns; i++)
			uf_wake(pt->uffd, pt->runs[2 * i], pt->runs[2 * i + 1]);
	for (i = 0; i < nk; i++) {
		/* never waits: the child's engine may be held, or stopped (uf_pt_settle, later;
		 * also for one without its uffd yet) */
		finish_copybacks(kids[i], 0);
		kick(kids[i]);
		uf_pt_unref(kids[i]);
	}
	free(kids);
	kick(pt);
	return rc;
}

/* ---- victims ----------------------------------------------------------------------- */

/* Choose up to want pages among `present` ((start, len) pairs of pages resident in
 * the target): the least recently faulted first (pages with no entry never came
 * through us and count as oldest), CLEAN before dirty at equal age.  Writes (start,
 * len) pairs in address order; returns the number of pairs. */
static int64_t victims_locked(uf_pt *pt, const uint64_t *present, size_t npresent, uint64_t want, uint64_t *out,
			      size_t max_out)
{
	uint64_t hist[2][257] = { { 0 } }, total = 0, acc = 0;
	int cut_age = -1, cut_clean = 1;
	size_t i, n = 0;

	if (!want)
		return 0;
	/* age histogram in 256 buckets (age = epoch - stamp, saturated) */
	for (i = 0; i < npresent; i++) {
		uint64_t a;
		for (a = present[2 * i]; a < present[2 * i] + present[2 * i + 1]; a += PG) {
			uint64_t v = ent_get(pt, a);
			int s = E_STATE(v), age;
			if (s != UF_PG_NONE && s != UF_PG_CLEAN)
				continue;
			age = v ? (uint16_t)(pt->epoch - E_STAMP(v)) : 256;
			if (age > 256)
				age = 256;
			hist[s == UF_PG_CLEAN][age]++;
			total++;
		}
	}
	/* oldest first; within an age, clean before dirty */
	for (int age = 256; age >= 0 && cut_age < 0; age--)
		for (int c = 1; c >= 0; c--) {
			acc += hist[c][age];
			if (acc >= want) {
				cut_age = age;
				cut_clean = c;
				break;
			}
		}
	if (cut_age < 0) {
		cut_age = 0;
		cut_clean = 0;
	}
	acc = 0;
	for (i = 0; i < npresent && acc < want; i++) {
		uint64_t a;
		for (a = present[2 * i]; a < present[2 * i] + present[2 * i + 1] && acc < want; a += PG) {
			uint64_t v = ent_get(pt, a);
			int s = E_STATE(v), age, c;
			if (s != UF_PG_NONE && s != UF_PG_CLEAN)
				continue;
			age = v ? (uint16_t)(pt->epoch - E_STAMP(v)) : 256;
			if (age > 256)
				age = 256;
			c = s == UF_PG_CLEAN;
			if (age < cut_age || (age == cut_age && c < cut_clean))
				continue;
			acc++;
			if (n && out[2 * (n - 1)] + out[2 * (n - 1) + 1] == a) {
				out[2 * (n - 1) + 1] += PG;
			} else if (n < max_out) {
				out[2 * n] = a;
				out[2 * n + 1] = PG;
				n++;
			} else {
				acc = want;
			}
		}
	}
	(void)total;
	return (int64_t)n;
}

int64_t uf_pt_victims(uf_pt *pt, const uint64_t *present, size_t npresent, uint64_t want, uint64_t *out,
		      size_t max_out)
{
	int64_t n;

	pthread_mutex_lock(&pt->lock);
	n = victims_locked(pt, present, npresent, want, out, max_out);
	pthread_mutex_unlock(&pt->lock);
	return n;
}

/* The resident pages of `regions` ((start, len) pairs) from the target's page map
 * (PAGEMAP_SCAN; pages mapping the shared zero page hold no memory and are left out;
 * pages shared with another process (after fork) are counted in *shared_out instead).
 * With pt and want > 0, also choose up to want victims among them as uf_pt_victims
 * does (pairs in out, their number in *nout).  Returns resident pages, or -errno. */
int64_t uf_pt_scan(uf_pt *pt, int pagemap_fd, const uint64_t *regions, size_t nregions, uint64_t want,
		   uint64_t *out, size_t max_out, int64_t *nout, uint64_t *shared_out)
{
	uint64_t shared = 0, *pm = NULL;
	size_t pmcap = 0;
	enum { VEC = 4096 };
	uint64_t *vec = malloc(VEC * 3 * sizeof(uint64_t)), *pres = NULL, resident = 0;
	size_t npres = 0, cappres = 0, i;
	int64_t rc = 0;

	if (nout)
		*nout = 0;
	if (!vec)
		return -ENOMEM;
	for (i = 0; i < nregions && rc >= 0; i++) {
		uint64_t pos = regions[2 * i], end = regions[2 * i] + regions[2 * i + 1];
		while (pos < end) {
			struct uf_scan sc = { .start = pos, .end = end, .category_mask = 1ULL << 3 /* PRESENT */,
					      .return_mask = (1ULL << 3) | (1ULL << 5) /* PRESENT, PFNZERO */ };
			int64_t n = uf_pagemap_scan(pagemap_fd, &sc, vec, VEC), k;
			if (n < 0) {
				rc = n;
				break;
			}
			for (k = 0; k < n; k++) {
				uint64_t s = vec[3 * k], e = vec[3 * k + 1];
				size_t np_ = (e - s) / PG, j;
				if (vec[3 * k + 2] & (1ULL << 5))
					continue; /* the zero page */
				/* pagemap bit 56: exclusively mapped.  A page shared after fork frees
				 * nothing when zapped (and the kernel refuses to move it): it is
				 * counted apart and never a victim */
				if (np_ > pmcap) {
					uint64_t *n2 = realloc(pm, np_ * sizeof(uint64_t));
					if (!n2) {
						rc = -ENOMEM;
						break;
					}
					pm = n2;
					pmcap = np_;
				}
				if (pread(pagemap_fd, pm, np_ * 8, (off_t)(s / PG * 8)) != (ssize_t)(np_ * 8)) {
					for (j = 0; j < np_; j++)
						pm[j] = 1ULL << 56; /* unknown: treat as exclusive */
				}
				for (j = 0; j < np_; j++) {
					uint64_t a = s + j * PG;
					if (!(pm[j] & (1ULL << 63)))
						continue; /* gone meanwhile */
					if (!(pm[j] & (1ULL << 56))) {
						shared++;
						continue;
					}
					resident++;
					if (!pt || !want)
						continue;
					if (npres && pres[2 * (npres - 1)] + pres[2 * (npres - 1) + 1] == a) {
						pres[2 * (npres - 1) + 1] += PG;
						continue;
					}
					if (npres == cappres) {
						size_t nc = cappres ? cappres * 2 : 1024;
						uint64_t *n2 = realloc(pres, nc * 2 * sizeof(uint64_t));
						if (!n2) {
							rc = -ENOMEM;
							break;
						}
						pres = n2;
						cappres = nc;
					}
					pres[2 * npres] = a;
					pres[2 * npres + 1] = PG;
					npres++;
				}
				if (rc < 0)
					break;
			}
			/* walk_end is not trusted (6.18 leaves it at internal flush points): a scan
			 * that filled the vector continues after its last region; one that did not
			 * walked to the end */
			if (n < VEC || rc < 0)
				break;
			pos = vec[3 * (n - 1) + 1];
		}
	}
	if (rc >= 0 && pt && want && npres) {
		int64_t n;
		pthread_mutex_lock(&pt->lock);
		n = victims_locked(pt, pres, npres, want, out, max_out);
		pthread_mutex_unlock(&pt->lock);
		if (nout)
			*nout = n;
	}
	free(vec);
	free(pres);
	free(pm);
	if (shared_out)
		*shared_out = shared;
	return rc < 0 ? rc : (int64_t)resident;
}

/* ---- faults (engine thread) ------------------------------------------------------- */

static uint64_t now_us(void) { return mono_ns() / 1000; }

static void latency(uf_pt *pt, const struct uf_msg *m)
{
	uint64_t x = (uint64_t)((uint32_t)now_us() - m->reserved3) + 1;
	int p = 63 - __builtin_clzll(x), f = p >= 2 ? (int)((x >> (p - 2)) & 3) : (int)((x << (2 - p)) & 3);
	int b = 4 * p + f;

	/* HDR-style buckets: b = 4 * floor(log2(us + 1)) + the next two bits */
	pt->st.lat_hist[b < UF_LAT_BUCKETS ? b : UF_LAT_BUCKETS - 1]++;
}

void uf_swap_stamp(struct uf_msg *m)
{
	if (!m->reserved3)
		m->reserved3 = (uint32_t)now_us() | 1;
}

int uf_copy_all_counted(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
			uint64_t *done, uint64_t *eexist);
/* zeros: the read-only source of UFFDIO_COPY for write faults on pages without content
 * (one page, or a fault-around window) */
static const char zero_window[UF_FT_MAX * 4096] __attribute__((aligned(4096)));

/* First-touch write fault at addr (entry v: no store copy), pt->lock held: install zero
 * pages for addr and, when first touches go sequentially, for the following pages that
 * have no saved content either (entry absent or NONE), up to a window that doubles while
 * the pattern holds (UF_FT_MAX) and is capped by the room under the limit.  Pages that
 * are present already are skipped by the copy (EEXIST); a window that crosses the end of
 * the mapping falls back to the one page.  Safe because every page filled would read as
 * zeros if it faulted: it has no store copy, is not in an eviction batch (TRANSIT), and
 * is missing.  Returns uf_copy_all's result for the faulting page; *done: bytes filled. */
static int first_touch_locked(uf_pt *pt, uint64_t addr, uint64_t fa_end, uint64_t *done)
{
	uint64_t vpn = addr / PG, n = 1, eexist = 0, i, filled;
	int rc;

	if (pt->ft_next && vpn == pt->ft_next)
		pt->ft_window = pt->ft_window ? (pt->ft_window * 2 > UF_FT_MAX ? UF_FT_MAX : pt->ft_window * 2) : 2;
	else
		pt->ft_window = 1;
	if (pt->budget) {
		int64_t lim = __atomic_load_n(&pt->budget->limit, __ATOMIC_RELAXED);
		int64_t room = lim - __atomic_load_n(&pt->budget->resident, __ATOMIC_RELAXED);
		if (lim > 0 && room < (int64_t)pt->ft_window)
			pt->ft_window = room > 1 ? (uint64_t)room : 1;
	}
	while (n < pt->ft_window && addr + n * PG < fa_end) {
		uint64_t w = ent_get(pt, addr + n * PG);
		if (w && (E_STATE(w) != UF_PG_NONE || E_SLOT(w)))
			break;
		n++;
	}
	*done = 0;
	rc = uf_copy_all_counted(pt->uffd, addr, (uint64_t)(uintptr_t)zero_window, n * PG,
				 UFFDIO_COPY_MODE_DONTWAKE, done, &eexist);
	if (rc == -ENOENT && *done == 0 && n > 1) { /* the window crossed the mapping's end */
		eexist = 0;
		rc = uf_copy_all_counted(pt->uffd, addr, (uint64_t)(uintptr_t)zero_window, PG,
					 UFFDIO_COPY_MODE_DONTWAKE, done, &eexist);
	}
	if (*done >= PG)
		rc = 0; /* the faulting page is in (or was); the rest of the window is a bonus */
	filled = *done / PG;
	for (i = 0; i < filled; i++) {
		uint64_t *e = ent_at(pt, addr + i * PG, 1);
		if (!e)
			continue;
		if (!*e)
			pt->counts[UF_PG_NONE]++;
		ent_set(pt, e, E_MAKE(0, UF_PG_NONE, pt->epoch));
	}
	if (filled > eexist)
		budget_add(pt->budget, (int64_t)(filled - eexist));
	pt->st.first_touch++;
	if (filled > 1)
		pt->st.fault_around += filled - 1;
	pt->ft_next = vpn + (filled ? filled : 1);
	return rc;
}

/* Install the store's copy `data` of the EVICTED page at addr (entry value v, pt->lock
 * held): write-protected when mode has UFFDIO_COPY_MODE_WP, so that the entry becomes
 * CLEAN and keeps its handle, else writable and NONE.  A range registered without WP
 * refuses COPY_MODE_WP (EINVAL): then the page is installed writable.  *mode_out: the
 * mode used.  Returns uf_copy_all's result; the entry changes only on success. */
static int install_locked(uf_pt *pt, uint64_t addr, uint64_t v, const void *data, uint64_t mode,
			  uint64_t extra, uint64_t *mode_out)
{
	uint64_t done = 0, eexist = 0, *e;
	int rc = uf_copy_all_counted(pt->uffd, addr, (uint64_t)(uintptr_t)data, PG, mode | extra, &done, &eexist);

	if (rc == -EINVAL && mode) {
		mode = 0;
		rc = uf_copy_all_counted(pt->uffd, addr, (uint64_t)(uintptr_t)data, PG, extra, &done, &eexist);
	}
	*mode_out = mode;
	if (rc)
		return rc;
	if (eexist && E_STATE(v) == UF_PG_CLEAN)
		return -EEXIST; /* there already (a second thread's fault on it): as it was */
	e = ent_at(pt, addr, 0);
	if (mode) {
		ent_set(pt, e, E_MAKE(E_SLOT(v), UF_PG_CLEAN, pt->epoch));
	} else {
		ent_swap(pt, e, E_MAKE(0, UF_PG_NONE, pt->epoch));
	}
	pt->st.swapins++;
	budget_add(pt->budget, 1);
	return 0;
}

/* Decide a fault.  Returns SWAP_DONE (resolved or nothing to do), SWAP_PARK (wait for
 * a commit or for room under the limit), SWAP_DEFER (EAGAIN: retry), SWAP_PASS (not
 * ours), or a negative errno (failed; *what says where). */
int uf_swap_fault(uf_pt *pt, struct uf_msg *m, void *bufs, int *what, uint64_t fa_end)
{
	uint64_t addr = m->b & ~(PG - 1), v, done = 0;
	int s, rc, wr = !!(m->a & UFFD_PAGEFAULT_FLAG_WRITE);
	uint64_t *e;

	*what = 0;
	pthread_mutex_lock(&pt->lock);
	v = ent_get(pt, addr);
	s = E_STATE(v);
	if (m->a & UFFD_PAGEFAULT_FLAG_WP) {
		if (s == UF_PG_TRANSIT && !(v & E_DROPPED)) {
			pthread_mutex_unlock(&pt->lock);
			return SWAP_PARK; /* decided by the commit: kept, or gone and faulted back */
		}
		if (s == UF_PG_CLEAN) {
			/* the store's copy stops being valid before the write goes through */
			e = ent_at(pt, addr, 0);
			ent_swap(pt, e, E_MAKE(0, UF_PG_NONE, pt->epoch));
			pt->st.dirtied++;
		}
		pthread_mutex_unlock(&pt->lock);
		if (s == UF_PG_EVICTED || s == UF_PG_ZERO) {
			uf_wake(pt->uffd, addr, PG); /* gone meanwhile: it faults back as MISSING */
			return SWAP_DONE;
		}
		{
			uint64_t r[2] = { addr, PG };
			rc = uf_writeprotect(pt->uffd, r, 1, 0, NULL);
		}
		if (rc == -EAGAIN)
			return SWAP_DEFER;
		uf_wake(pt->uffd, addr, PG);
		pt->st.wp_faults++;
		return SWAP_DONE;
	}
	if (s == UF_PG_TRANSIT) {
		pthread_mutex_unlock(&pt->lock);
		return SWAP_PARK;
	}
	if (pt->budget && (s == UF_PG_EVICTED || wr) && (uint32_t)m->c != pt->exempt_tid) {
		int64_t lim = __atomic_load_n(&pt->budget->limit, __ATOMIC_RELAXED);
		if (lim > 0 && __atomic_load_n(&pt->budget->resident, __ATOMIC_RELAXED) >= lim) {
			pthread_mutex_unlock(&pt->lock);
			__atomic_fetch_add(&pt->budget->parked, 1, __ATOMIC_RELAXED);
			if (pt->budget->notify_fd >= 0) {
				uint64_t one = 1;
				if (write(pt->budget->notify_fd, &one, sizeof(one)) < 0) {
				}
			}
			return SWAP_PARK;
		}
	}
	/* A CLEAN page is resident, its store copy valid: a MISSING fault on one is
	 * mostly a second thread's fault on a page the first one's brought back (the copy
	 * finds it there: nothing changes).  One that is really missing - not seen to
	 * happen - is brought back from its store copy below, which is its content by
	 * definition (never written since it was saved: writes fault first), never as a
	 * zero page (counted in clean_missing). */
	if ((s == UF_PG_EVICTED || s == UF_PG_CLEAN) && pt->store->kind == UF_STORE_EXTERNAL) {
		pthread_mutex_unlock(&pt->lock);
		return SWAP_PASS; /* its owner reads it (uf_pt_install) */
	}
	if (s == UF_PG_EVICTED || s == UF_PG_CLEAN) {
		uint64_t ra[UF_RA_MAX], nra = 0, i, mode;
		int64_t got;
		char *b = bufs;
		uint64_t vpn = addr / PG;

		rc = uf_store_get(pt->store, E_SLOT(v), b);
		if (rc < 0) {
			pthread_mutex_unlock(&pt->lock);
			*what = UF_FAIL_STORE;
			return rc;
		}
		/* read-ahead: after a sequential fault, bring the next evicted pages too; the
		 * window doubles while the pattern holds and closes on a random fault.  (Not
		 * for a CLEAN page: mostly a second thread's fault on a page already back, which
		 * says nothing of the access pattern.) */
		if (s == UF_PG_EVICTED) {
			if (pt->last_fault && (vpn == pt->last_fault + 1 ||
					       (vpn > pt->last_fault && vpn <= pt->last_fault + pt->ra_window + 1)))
				pt->ra_window = pt->ra_window ? (pt->ra_window * 2 > UF_RA_MAX ? UF_RA_MAX
											: pt->ra_window * 2)
							      : 2;
			else
				pt->ra_window = 0;
			for (i = 1; i <= pt->ra_window; i++) {
				uint64_t w = ent_get(pt, addr + i * PG);
				if (E_STATE(w) != UF_PG_EVICTED)
					break;
				if (uf_store_get(pt->store, E_SLOT(w), b + i * PG) < 0)
					break;
				ra[nra++] = w;
			}
		}
		/* read faults install write-protected and keep the store copy (CLEAN) */
		mode = (pt->wp && !wr) ? UFFDIO_COPY_MODE_WP : 0;
		{
			uint64_t asked = mode;
			rc = install_locked(pt, addr, v, b, asked, UFFDIO_COPY_MODE_DONTWAKE, &mode);
			if (rc == 0 && s == UF_PG_CLEAN)
				pt->st.clean_missing++;
			if (asked && !mode)
				nra = 0; /* registered without WP: read-ahead pages could not stay CLEAN */
		}
		if (rc == 0) {
			got = 0;
			if (nra && pt->wp) {
				uint64_t rdone = 0;
				int r2 = uf_copy_all(pt->uffd, addr + PG, (uint64_t)(uintptr_t)(b + PG), nra * PG,
						     UFFDIO_COPY_MODE_WP | UFFDIO_COPY_MODE_DONTWAKE, &rdone);
				(void)r2;
				got = (int64_t)(rdone / PG);
				for (i = 0; i < (uint64_t)got; i++) {
					e = ent_at(pt, addr + (i + 1) * PG, 0);
					ent_set(pt, e, E_MAKE(E_SLOT(ra[i]), UF_PG_CLEAN, pt->epoch));
				}
				pt->st.readahead += (uint64_t)got;
				pt->st.swapins += (uint64_t)got;
				budget_add(pt->budget, got);
			}
			pt->last_fault = vpn + (uint64_t)got;
			latency(pt, m);
		}
		pthread_mutex_unlock(&pt->lock);
		if (rc == 0 || rc == -EEXIST) {
			uf_wake(pt->uffd, addr, PG);
			return SWAP_DONE;
		}
		if (rc == -EAGAIN)
			return SWAP_DEFER;
		if (rc == -ENOENT || rc == -ESRCH)
			return SWAP_DONE; /* the mapping or the process is gone */
		*what = UF_FAIL_RESOLVE;
		return rc;
	}
	/* ZERO, NONE (never touched, or discarded by the application), CLEAN that is not
	 * there (cannot happen: an event would have reset it) */
	if (wr && s != UF_PG_ZERO && !E_SLOT(v)) {
		rc = first_touch_locked(pt, addr, fa_end, &done);
		pthread_mutex_unlock(&pt->lock);
		if (rc == 0 || rc == -EEXIST) {
			uf_wake(pt->uffd, addr, done > PG ? done : PG);
			return SWAP_DONE;
		}
		goto failed;
	}
	if (wr) {
		rc = uf_copy_all(pt->uffd, addr, (uint64_t)(uintptr_t)zero_window, PG, UFFDIO_COPY_MODE_DONTWAKE, &done);
		if (rc == 0)
			budget_add(pt->budget, 1);
	} else {
		rc = uf_zeropage_all(pt->uffd, addr, PG, UFFDIO_ZEROPAGE_MODE_DONTWAKE, &done);
	}
	if (rc == 0) {
		e = ent_at(pt, addr, 1);
		if (e) {
			if (!*e)
				pt->counts[UF_PG_NONE]++;
			ent_swap(pt, e, E_MAKE(0, UF_PG_NONE, pt->epoch));
		}
		if (s == UF_PG_ZERO) {
			pt->st.swapins++;
			latency(pt, m);
		} else {
			pt->st.first_touch++;
		}
	}
	pthread_mutex_unlock(&pt->lock);
	if (rc == 0 || rc == -EEXIST) {
		uf_wake(pt->uffd, addr, PG);
		return SWAP_DONE;
	}
failed:
	if (rc == -EAGAIN)
		return SWAP_DEFER;
	if (rc == -ENOENT || rc == -ESRCH)
		return SWAP_DONE;
	*what = UF_FAIL_RESOLVE;
	return rc;
}

/* Bring every evicted page back (release, detach): EVICTED and ZERO pages are
 * installed (EEXIST - already back - is fine) and become NONE.  Returns the number of
 * pages installed, or -errno (the first failure; the rest stay evicted). */
int64_t uf_pt_fill_all(uf_pt *pt)
{
	size_t i, j;
	int64_t n = 0;
	int rc = 0;
	void *b = NULL;

	if (posix_memalign(&b, PG, PG))
		return -ENOMEM;
	pthread_mutex_lock(&pt->lock);
	for (i = 0; i < pt->ntab && rc == 0; i++) {
		if (!pt->tab[i].key)
			continue;
		for (j = 0; j < LEAF_N && rc == 0; j++) {
			uint64_t *e = &pt->tab[i].ents[j], v = *e, done = 0;
			uint64_t addr = ((pt->tab[i].key - 1) << LEAF_SHIFT | j) * PG;
			int s = E_STATE(v);
			if (s == UF_PG_EVICTED && pt->store->kind == UF_STORE_EXTERNAL) {
				continue; /* its owner brings these back (uf_pt_list, uf_pt_install) */
			} else if (s == UF_PG_EVICTED) {
				rc = uf_store_get(pt->store, E_SLOT(v), b);
				if (rc == 0)
					rc = uf_copy_all(pt->uffd, addr, (uint64_t)(uintptr_t)b, PG, 0, &done);
			} else if (s == UF_PG_ZERO) {
				rc = uf_zeropage_all(pt->uffd, addr, PG, 0, &done);
			} else {
				continue;
			}
			if (rc == -EEXIST || rc == -ENOENT)
				rc = 0; /* already back / no longer mapped */
			if (rc == 0) {
				ent_swap(pt, e, E_MAKE(0, UF_PG_NONE, E_STAMP(v)));
				n++;
			}
		}
	}
	pthread_mutex_unlock(&pt->lock);
	free(b);
	return rc < 0 ? rc : n;
}

/* ---- one eviction batch after the agent's MOVE, all in C ------------------------------- */

static int cmp_pair(const void *a, const void *b);

/* What the agent moves, as (src, dst, len) triples into `scratch` (a batch page goes
 * to scratch + its index): each page of the batch at its address now (remaps since
 * begin followed), leaving out the pages that are not TRANSIT there any more or were
 * dropped (unmapped, discarded) - whatever sits at such an address now is not ours.
 *
 * Call it under uf_engine_hold and let the hold go only after the MOVE: with every
 * event read so far applied and none read until then, the kernel cannot replace a
 * mapping under the MOVE (an unmap or remap waits for its event to be read, and the
 * MOVE fails with EAGAIN meanwhile), so every page moved is the page the table
 * describes.  Without the hold, a program that unmapped such a page and mapped new
 * memory at its address (glibc's malloc does, with raw syscalls nobody registers)
 * would have the new page's data moved out and dropped with the old one.
 * At most max triples (one agent message holds so many): the pages after them are
 * not moved, and stay resident when the batch is committed.  Returns the number of
 * triples. */
int64_t uf_pt_batch_triples(uf_pt *pt, uint64_t scratch, uint64_t *out, size_t max)
{
	size_t n = 0;
	int full = 0;

	pthread_mutex_lock(&pt->lock);
	FOR_BATCH_PAGES(pt, idx, addr) {
		uint64_t a = translate(pt, addr), v = a ? ent_get(pt, a) : 0, dst = scratch + idx * PG;
		if (full || E_STATE(v) != UF_PG_TRANSIT || (v & E_DROPPED))
			continue;
		if (n && out[3 * (n - 1)] + out[3 * (n - 1) + 2] == a &&
		    out[3 * (n - 1) + 1] + out[3 * (n - 1) + 2] == dst) {
			out[3 * (n - 1) + 2] += PG;
			continue;
		}
		if (n == max) {
			full = 1;
			continue;
		}
		out[3 * n] = a;
		out[3 * n + 1] = dst;
		out[3 * n + 2] = PG;
		n++;
	}
	if (pt->captrip < n) {
		uint64_t *t = realloc(pt->trip, n * 3 * sizeof(uint64_t));
		if (!t) {
			pthread_mutex_unlock(&pt->lock);
			return -ENOMEM;
		}
		pt->trip = t;
		pt->captrip = n;
	}
	memcpy(pt->trip, out, n * 3 * sizeof(uint64_t));
	/* by source address, for uf_pt_collect's look-ups (sources never overlap) */
	qsort(pt->trip, n, 3 * sizeof(uint64_t), cmp_pair);
	pt->ntrip = n;
	if (pt->batch)
		__atomic_store_n(&pt->th->scratch, scratch, __ATOMIC_RELEASE); /* before the MOVE */
	pthread_mutex_unlock(&pt->lock);
	return (int64_t)n;
}

struct rjob {
	int pid;
	const uint64_t *loc, *rem;
	size_t n;
	int64_t got;
};

static void rjob_run(void *a)
{
	struct rjob *r = a;
	r->got = uf_process_vm_readv(r->pid, r->loc, r->n, r->rem, r->n);
}

/* Read the (batch offset, len) runs `need` (want bytes in all) from scratch in the
 * target to buf: two process_vm_readv calls in parallel for a big batch (the helper
 * takes the second half), one otherwise.  loc and rem hold nneed + 1 pairs.  Returns
 * the bytes read (want when all went well) or -errno. */
static int64_t read_pages(int pid, const uint64_t *need, size_t nneed, uint64_t want, uint64_t buf,
			  uint64_t scratch, uint64_t *loc, uint64_t *rem)
{
	uint64_t acc = 0, half = want >= 256 * PG ? (want / 2) & ~(PG - 1) : want;
	size_t i, k = 0, cut = 0;
	struct rjob second;

	for (i = 0; i < nneed; i++) {
		uint64_t o = need[2 * i], n = need[2 * i + 1];
		if (!cut && acc + n > half && acc < half) { /* this run straddles the middle */
			uint64_t a = half - acc;
			loc[2 * k] = buf + o;
			rem[2 * k] = scratch + o;
			loc[2 * k + 1] = rem[2 * k + 1] = a;
			k++;
			o += a;
			n -= a;
			acc += a;
		}
		if (!cut && acc >= half)
			cut = k;
		loc[2 * k] = buf + o;
		rem[2 * k] = scratch + o;
		loc[2 * k + 1] = rem[2 * k + 1] = n;
		k++;
		acc += n;
	}
	if (!cut || cut >= k)
		return uf_process_vm_readv(pid, loc, k, rem, k);
	second = (struct rjob){ pid, loc + 2 * cut, rem + 2 * cut, k - cut, 0 };
	if (!par_start(rjob_run, &second))
		return uf_process_vm_readv(pid, loc, k, rem, k);
	int64_t first = uf_process_vm_readv(pid, loc, cut, rem, cut);
	par_wait();
	if (first < 0)
		return first;
	if ((uint64_t)first < half)
		return first; /* short: the caller sees got != want */
	return second.got < 0 ? second.got : first + second.got;
}

static int cmp_pair(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* After the agent moved pages (moved: (source address, len) pairs, as it reported
 * them): find which moved pages sit in the scratch area (page map), read those without
 * a valid store copy with one process_vm_readv into buf (batch offsets), and commit.
 * -EIO (nothing committed) when the read failed: the batch stays open (its pages sit
 * in the scratch area, their faults wait) and the caller retries or reports it; only
 * when the process is gone does it commit an empty batch.  *scratch_used: bytes of
 * scratch that may hold pages. */
int uf_pt_collect(uf_pt *pt, int pid, int pagemap_fd, uint64_t scratch, const uint64_t *moved,
		  size_t nmoved, uint64_t buf, struct uf_commit *res, uint64_t *scratch_used)
{
	uint64_t *mo = malloc((nmoved ? nmoved : 1) * 2 * sizeof(uint64_t));
	uint64_t *pres = NULL, *need = NULL, *loc = NULL, *rem = NULL, used = 0, want = 0;
	uint64_t t0 = mono_ns(), t1;
	int64_t npres = 0, nneed = 0, got;
	size_t i, k;
	int rc = 0;

	*scratch_used = 0;
	if (!mo)
		return -ENOMEM;
	/* moved source ranges -> batch offsets, through the triples of the MOVE (the agent
	 * joins ranges that touch at the source: one may span several triples) */
	{
		size_t nmo = 0, capmo = nmoved ? nmoved : 1;
		pthread_mutex_lock(&pt->lock);
		for (i = 0; i < nmoved; i++) {
			uint64_t a = moved[2 * i], end = a + moved[2 * i + 1];
			size_t lo_k = 0, hi_k = pt->ntrip;
			while (lo_k < hi_k) { /* the first triple that ends after a */
				size_t mid = (lo_k + hi_k) / 2;
				if (pt->trip[3 * mid] + pt->trip[3 * mid + 2] <= a)
					lo_k = mid + 1;
				else
					hi_k = mid;
			}
			for (k = lo_k; k < pt->ntrip && pt->trip[3 * k] < end; k++) {
				uint64_t s0 = pt->trip[3 * k], s1 = s0 + pt->trip[3 * k + 2];
				uint64_t lo = a > s0 ? a : s0, hi = end < s1 ? end : s1;
				if (lo >= hi)
					continue;
				if (nmo == capmo) {
					uint64_t *m2 = realloc(mo, capmo * 2 * 2 * sizeof(uint64_t));
					if (!m2) {
						pthread_mutex_unlock(&pt->lock);
						free(mo);
						return -ENOMEM;
					}
					mo = m2;
					capmo *= 2;
				}
				mo[2 * nmo] = pt->trip[3 * k + 1] - scratch + (lo - s0);
				mo[2 * nmo + 1] = hi - lo;
				nmo++;
			}
		}
		pthread_mutex_unlock(&pt->lock);
		nmoved = nmo;
		qsort(mo, nmoved, 2 * sizeof(uint64_t), cmp_pair);
		/* join neighbours (the pairs are looked up by binary search) */
		for (i = 0, k = 0; i < nmoved; i++) {
			if (k && mo[2 * (k - 1)] + mo[2 * (k - 1) + 1] == mo[2 * i]) {
				mo[2 * (k - 1) + 1] += mo[2 * i + 1];
				continue;
			}
			mo[2 * k] = mo[2 * i];
			mo[2 * k + 1] = mo[2 * i + 1];
			k++;
		}
		nmoved = k;
	}
	for (i = 0; i < nmoved; i++)
		if (mo[2 * i] + mo[2 * i + 1] > used)
			used = mo[2 * i] + mo[2 * i + 1];
	*scratch_used = used;
	if (nmoved) {
		/* present pages of the scratch area, as batch offsets */
		uint64_t reg[2] = { scratch, used };
		size_t cap = 1024;
		enum { VEC = 4096 };
		uint64_t *vec = malloc(VEC * 3 * sizeof(uint64_t));
		pres = malloc(cap * 2 * sizeof(uint64_t));
		if (!vec || !pres) {
			free(vec);
			rc = -ENOMEM;
			goto out;
		}
		uint64_t pos = reg[0], end = reg[0] + reg[1];
		while (pos < end) {
			struct uf_scan sc = { .start = pos, .end = end,
					      .category_anyof_mask = (1ULL << 3) | (1ULL << 4), /* PRESENT|SWAPPED */
					      .return_mask = (1ULL << 3) | (1ULL << 4) };
			int64_t n = uf_pagemap_scan(pagemap_fd, &sc, vec, VEC), j;
			if (n < 0) {
				rc = (int)n;
				break;
			}
			for (j = 0; j < n; j++) {
				if ((size_t)npres == cap) {
					uint64_t *np = realloc(pres, cap * 4 * sizeof(uint64_t));
					if (!np) {
						rc = -ENOMEM;
						break;
					}
					pres = np;
					cap *= 2;
				}
				pres[2 * npres] = vec[3 * j] - scratch;
				pres[2 * npres + 1] = vec[3 * j + 1] - vec[3 * j];
				npres++;
			}
			if (n < VEC || rc < 0)
				break;
			pos = vec[3 * (n - 1) + 1];
		}
		free(vec);
		if (rc < 0)
			goto out;
		/* need_read can split a present run where clean pages sit: at most one run per page */
		need = malloc((used / PG + 1) * 2 * sizeof(uint64_t));
		if (!need) {
			rc = -ENOMEM;
			goto out;
		}
		/* a page present in scratch that this batch did not move (a leftover of an
		 * earlier batch) is not ours to read: keep only present AND moved */
		{
			int64_t j, w = 0;
			/* at most one run per page of the scratch area */
			uint64_t *keep = malloc((used / PG + 1) * 2 * sizeof(uint64_t));
			if (!keep) {
				rc = -ENOMEM;
				goto out;
			}
			for (j = 0; j < npres; j++) {
				uint64_t o, e0 = pres[2 * j] + pres[2 * j + 1];
				for (o = pres[2 * j]; o < e0; o += PG) {
					if (!in_pairs(mo, nmoved, o))
						continue;
					if (w && keep[2 * (w - 1)] + keep[2 * (w - 1) + 1] == o) {
						keep[2 * (w - 1) + 1] += PG;
					} else {
						keep[2 * w] = o;
						keep[2 * w + 1] = PG;
						w++;
					}
				}
			}
			free(pres);
			pres = keep;
			npres = w;
		}
		nneed = uf_pt_need_read(pt, pres, (size_t)npres, need, used / PG + 1);
		if (nneed < 0) {
			rc = (int)nneed;
			goto out;
		}
		if (nneed) {
			/* one more entry: a run may be cut in two where the halves meet */
			loc = malloc(((size_t)nneed + 1) * 2 * sizeof(uint64_t));
			rem = malloc(((size_t)nneed + 1) * 2 * sizeof(uint64_t));
			if (!loc || !rem) {
				rc = -ENOMEM;
				goto out;
			}
			for (i = 0; i < (size_t)nneed; i++)
				want += need[2 * i + 1];
			t1 = mono_ns();
			__atomic_fetch_add(&pt->st.ns_find, t1 - t0, __ATOMIC_RELAXED);
			got = read_pages(pid, need, (size_t)nneed, want, buf, scratch, loc, rem);
			t0 = mono_ns();
			__atomic_fetch_add(&pt->st.ns_read, t0 - t1, __ATOMIC_RELAXED);
			if (got != (int64_t)want) {
				rc = got < 0 ? (int)got : -EIO;
				goto out;
			}
		}
	}
	if (pt->store->kind == UF_STORE_EXTERNAL) {
		/* the owner puts the pages: keep what the commit needs, return 1 */
		pthread_mutex_lock(&pt->lock);
		free(pt->pend_moved);
		free(pt->pend_read);
		pt->pend_moved = mo;
		pt->pend_nmoved = nmoved;
		pt->pend_read = need;
		pt->pend_nread = need ? (size_t)nneed : 0;
		pt->pend_ok = 1;
		pthread_mutex_unlock(&pt->lock);
		mo = need = NULL;
		rc = 1;
		goto out;
	}
	rc = uf_pt_commit(pt, mo, nmoved, need ? need : mo, need ? (size_t)nneed : 0, buf, res);
out:
	free(mo);
	free(pres);
	free(need);
	free(loc);
	free(rem);
	return rc;
}

/* An external store's page, read by its owner after a forwarded fault: installed at
 * addr if the entry is still EVICTED with this key (read faults write-protected, keeping
 * the copy: CLEAN).  Returns 1 installed, 0 not needed any more (the threads waiting on
 * addr are woken and fault again if the page is still missing), -errno on failure. */
int uf_pt_install(uf_pt *pt, uint64_t addr, uint64_t key, const void *data, int write)
{
	uint64_t v, mode;
	uint64_t *e;
	int rc;

	addr &= ~(PG - 1);
	pthread_mutex_lock(&pt->lock);
	e = ent_at(pt, addr, 0);
	v = e ? *e : 0;
	if ((E_STATE(v) != UF_PG_EVICTED && E_STATE(v) != UF_PG_CLEAN) || E_SLOT(v) != (key << 4)) {
		pthread_mutex_unlock(&pt->lock);
		uf_wake(pt->uffd, addr, PG);
		return 0;
	}
	mode = (pt->wp && !write) ? UFFDIO_COPY_MODE_WP : 0;
	rc = install_locked(pt, addr, v, data, mode, 0, &mode);
	if (rc == 0) {
		st_lock(pt->store);
		pt->store->st->gets++;
		st_unlock(pt->store);
	}
	pthread_mutex_unlock(&pt->lock);
	if (rc == -EEXIST || rc == -ENOENT || rc == -ESRCH)
		return 0;
	return rc < 0 ? rc : 1;
}

/* (address, key) of every page in `state` (EVICTED: an external store's pages to bring
 * back at release).  Returns the number of pairs (at most max). */
int64_t uf_pt_list(uf_pt *pt, int state, uint64_t *out, size_t max)
{
	size_t i, j, n = 0;

	pthread_mutex_lock(&pt->lock);
	for (i = 0; i < pt->ntab && n < max; i++) {
		if (!pt->tab[i].key)
			continue;
		for (j = 0; j < LEAF_N && n < max; j++) {
			uint64_t v = pt->tab[i].ents[j];
			if (E_STATE(v) != state || !v)
				continue;
			out[2 * n] = ((pt->tab[i].key - 1) << LEAF_SHIFT | j) * PG;
			out[2 * n + 1] = E_SLOT(v) >> 4;
			n++;
		}
	}
	pthread_mutex_unlock(&pt->lock);
	return (int64_t)n;
}

/* ---- taking over from a killed manager ---------------------------------------------- */

/* Whether h can name a page of store s (0 does: no handle).  A memory-store handle
 * lies in a chunk in use and its header is sane; a file slot is inside the file. */
static int handle_valid(uf_store *s, uint64_t h)
{
	if (!h)
		return 1;
	if (s->kind == UF_STORE_MEMORY) {
		uint64_t end = (s->nchunks + 1) * BLOB_CHUNK, len;
		if (h < BLOB_CHUNK || h % BLOB_UNIT || h + 4 > end)
			return 0;
		len = mem_hdr(s, h)[0];
		return len <= PG && h + 4 + (len ? len : PG) <= end;
	}
	if (s->kind == UF_STORE_FILE)
		return (h >> 4) >= 1 && (h >> 4) <= s->nslots;
	return 1;
}

/* Let go of an adopted table without touching the store: its entries' references
 * belong to the memfd the agent still keeps, for whoever takes over next. */
static void pt_abandon(uf_pt *pt, int close_fd)
{
	munmap(pt->tmap, PT_SIZE);
	if (close_fd)
		close(pt->tfd);
	free(pt->tab);
	free(pt->runs);
	free(pt->trip);
	free(pt->log);
	uf_store_free(pt->store);
	pthread_mutex_destroy(&pt->lock);
	free(pt);
}

void uf_pt_abandon(uf_pt *pt)
{
	if (pt)
		pt_abandon(pt, 1);
}

/* The page table of a process whose manager died (fd: the memfd its agent kept, which
 * the table owns if it is returned), over `store` (the dead manager's store, adopted).  The batch in
 * flight, if any, is loaded for uf_pt_recover, which must run before the table serves a
 * fault. */
uf_pt *uf_pt_adopt(uf_store *store, int fd, int *err)
{
	uf_pt *pt = calloc(1, sizeof(*pt));
	uint64_t i, j, n;

	if (!pt) {
		*err = -ENOMEM;
		return NULL;
	}
	pt->tfd = fd;
	if (pt_map(pt) < 0) {
		*err = -errno;
		free(pt);
		return NULL;
	}
	n = pt->th->nleaves;
	if (pt->th->magic != PT_MAGIC || pt->th->version != 1 || n > PT_LEAVES_MAX ||
	    pt->th->store_kind != (uint64_t)store->kind) {
		munmap(pt->tmap, PT_SIZE);
		free(pt);
		*err = -EBADMSG;
		return NULL;
	}
	pt_init(pt, store);
	/* nothing is written here until the table is whole: a manager killed while it
	 * adopts leaves the memfd as it found it */
	for (i = 0; i < n; i++) {
		uint64_t key = PT_DIR(pt)[i];
		struct leafslot *ls;
		if (!key || tab_find(pt, key) || ((pt->nleaves + 1) * 2 > pt->ntab && tab_grow(pt)))
			goto bad;
		for (j = hash64(key) & (pt->ntab - 1); pt->tab[j].key; j = (j + 1) & (pt->ntab - 1))
			;
		ls = &pt->tab[j];
		ls->ents = (uint64_t *)(pt->tmap + PT_LEAF_OFF + i * LEAF_N * 8);
		ls->key = key;
		pt->nleaves++;
		for (uint64_t k = 0; k < LEAF_N; k++) {
			uint64_t v = ls->ents[k];
			if (!v)
				continue;
			if (E_STATE(v) > UF_PG_ZERO || !handle_valid(store, E_SLOT(v)))
				goto bad; /* not a table we wrote: nothing in it is trusted */
			pt->counts[E_STATE(v)]++;
			if (E_STAMP(v) > pt->epoch)
				pt->epoch = E_STAMP(v);
		}
	}
	n = pt->th->nruns;
	if (n && !pt->th->unknown) {
		pt->runs = malloc(n * 2 * sizeof(uint64_t));
		pt->log = malloc((pt->th->nlog ? pt->th->nlog : 1) * sizeof(struct remap));
		if (!pt->runs || !pt->log || n > PT_RUNS_MAX || pt->th->nlog > PT_LOG_MAX)
			goto bad;
		memcpy(pt->runs, PT_RUNS(pt), n * 2 * sizeof(uint64_t));
		pt->nruns = pt->capruns = n;
		memcpy(pt->log, PT_LOG(pt), pt->th->nlog * sizeof(struct remap));
		pt->nlog = pt->caplog = pt->th->nlog;
	}
	*err = 0;
	return pt;
bad:
	/* not uf_pt_unref: the entries' references are the store's, not ours to drop */
	*err = -EBADMSG;
	pt_abandon(pt, 0); /* fd stays the caller's */
	return NULL;
}

/* Whether addr is mapped in the process (present, or in the kernel's swap): -1 when the
 * page map cannot be read. */
static int pm_mapped(int pagemap_fd, uint64_t addr)
{
	uint64_t v;

	if (pread(pagemap_fd, &v, 8, (off_t)(addr / PG * 8)) != 8)
		return -1;
	return (int)((v >> 62) & 3) != 0;
}

/* Finish a remap that a killed manager was applying (lock held): the destination's old
 * entries dropped (phase 1), then each source entry moved unless it already is.  Every
 * step of uf_pt_event's remap leaves references too many, never too few, so doing a step
 * again only leaks. */
static void remap_finish(uf_pt *pt)
{
	struct pt_head *h = pt->th;
	uint64_t i, n = h->remap_len / PG;

	if (!h->remap_len)
		return;
	if (h->remap_phase == 1)
		drop_range(pt, h->remap_to, h->remap_to + h->remap_len);
	for (i = 0; i < n; i++) {
		uint64_t *e = ent_at(pt, h->remap_from + i * PG, 0), v = e ? *e : 0, *d;
		if (!v)
			continue;
		d = ent_at(pt, h->remap_to + i * PG, 1);
		if (!d)
			continue; /* no memory: it stays at the source (a leak, not a loss) */
		if (*d != v)
			ent_put(pt, h->remap_to + i * PG, v); /* (the destination was dropped) */
		ent_set(pt, e, 0); /* its reference went with it */
	}
	h->remap_len = 0;
}

/* The batch in flight of a table whose collect will never come (lock held; the lock
 * is let go around each store put, so every entry is looked at again after it): each
 * TRANSIT page is decided from the page map of the process that owns the table.  Mapped
 * there: NONE.  In its scratch area (moved there before its manager died, or before it
 * was forked from a parent that died): read, stored, EVICTED.  Nowhere: a clean page is
 * EVICTED (its store copy is the page), another is NONE (a hole, never there to move).
 * A page discarded meanwhile is dropped.  -ESRCH when the page map cannot be read. */
static int recover_batch_locked(uf_pt *pt, int pid, int pagemap_fd, char *buf, uint64_t *out)
{
	uint64_t scratch = pt->th->scratch;

	FOR_BATCH_PAGES(pt, idx, a0) {
		uint64_t a = translate(pt, a0), *e = ent_at(pt, a, 0), v, h = 0, src = scratch + idx * PG;
		int m;
		if (!e || E_STATE(*e) != UF_PG_TRANSIT)
			continue;
		v = *e;
		if (v & E_DROPPED) {
			ent_swap(pt, e, 0);
			out[3]++;
			continue;
		}
		m = pm_mapped(pagemap_fd, a);
		if (m < 0)
			return -ESRCH;
		if (m) {
			ent_swap(pt, e, E_MAKE(0, UF_PG_NONE, E_STAMP(v)));
			out[2]++;
			continue;
		}
		m = scratch ? pm_mapped(pagemap_fd, src) : 0;
		if (m < 0)
			return -ESRCH;
		if (!m) {
			if (E_SLOT(v)) {
				/* (counted with the evicted pages by whoever counts those) */
				ent_set(pt, e, E_MAKE(E_SLOT(v), UF_PG_EVICTED, E_STAMP(v)));
			} else {
				ent_swap(pt, e, E_MAKE(0, UF_PG_NONE, E_STAMP(v)));
				out[2]++;
			}
			continue;
		}
		struct iovec l = { buf, PG }, r = { (void *)(uintptr_t)src, PG };
		if (process_vm_readv(pid, &l, 1, &r, 1, 0) != (ssize_t)PG)
			continue; /* it keeps waiting (out[4]) */
		if (is_zero(buf)) {
			ent_swap(pt, e, E_MAKE(0, UF_PG_ZERO, E_STAMP(v)));
		} else {
			pthread_mutex_unlock(&pt->lock); /* store_put_pages takes the store lock */
			int64_t got = store_put_pages(pt->store, buf, NULL, 1, &h);
			pthread_mutex_lock(&pt->lock);
			if (got != 1)
				continue; /* full: it keeps waiting (out[4]) */
			e = ent_at(pt, a, 0);
			if (!e || *e != v) {
				/* an event changed it meanwhile (a served table): it decides */
				pt_drop_handle(pt, h);
				continue;
			}
			ent_swap(pt, e, E_MAKE(h, UF_PG_EVICTED, E_STAMP(v)));
		}
		out[1]++;
	}
	return 0;
}

/* Make an adopted table true again (before it serves anything; the process may run,
 * but a missing page stays missing until served and a present one stays present until
 * its REMOVE/UNMAP event is read, so what the page map says holds).  The dead manager
 * may have stopped anywhere:
 *  - the batch in flight: recover_batch_locked;
 *  - an EVICTED or ZERO page that is present was installed just before the end: NONE;
 *  - a CLEAN page that is not present is EVICTED (its store copy is the page);
 *  - a TRANSIT page found nowhere keeps waiting (reported in out[4]; no zeros).
 * out: [0] pages evicted, [1] read from the scratch area, [2] found resident, [3]
 * dropped, [4] left waiting, [5] clean.  Returns 0 or -errno (the process is gone). */
int uf_pt_recover(uf_pt *pt, int pid, int pagemap_fd, uint64_t *out)
{
	uint64_t *pm = malloc(LEAF_N * 8);
	char *buf = aligned_alloc(PG, PG);
	size_t i, j;
	int rc = 0;

	memset(out, 0, 6 * sizeof(uint64_t));
	if (!pm || !buf) {
		free(pm);
		free(buf);
		return -ENOMEM;
	}
	pthread_mutex_lock(&pt->lock);
	remap_finish(pt); /* a remap the dead manager was applying */
	pthread_mutex_unlock(&pt->lock);
	pthread_mutex_lock(&pt->lock);
	rc = recover_batch_locked(pt, pid, pagemap_fd, buf, out);
	if (rc < 0)
		goto done;
	for (i = 0; i < pt->ntab; i++) {
		uint64_t base;
		if (!pt->tab[i].key)
			continue;
		base = (pt->tab[i].key - 1) << LEAF_SHIFT;
		if (pread(pagemap_fd, pm, LEAF_N * 8, (off_t)(base * 8)) != (ssize_t)(LEAF_N * 8)) {
			rc = -ESRCH;
			goto done;
		}
		for (j = 0; j < LEAF_N; j++) {
			uint64_t *e = &pt->tab[i].ents[j], v = *e;
			int mapped = (int)((pm[j] >> 62) & 3) != 0, s = E_STATE(v);
			if (!v)
				continue;
			if (s == UF_PG_TRANSIT && (v & E_DROPPED)) {
				ent_swap(pt, e, 0);
				out[3]++;
			} else if (s == UF_PG_TRANSIT && mapped) {
				ent_swap(pt, e, E_MAKE(0, UF_PG_NONE, E_STAMP(v)));
				out[2]++;
			} else if (s == UF_PG_TRANSIT && E_SLOT(v)) {
				ent_set(pt, e, E_MAKE(E_SLOT(v), UF_PG_EVICTED, E_STAMP(v)));
				out[0]++;
			} else if (s == UF_PG_TRANSIT) {
				out[4]++;
			} else if ((s == UF_PG_EVICTED || s == UF_PG_ZERO) && mapped) {
				ent_swap(pt, e, E_MAKE(0, UF_PG_NONE, E_STAMP(v)));
				out[2]++;
			} else if (s == UF_PG_EVICTED || s == UF_PG_ZERO) {
				out[0]++;
			} else if (s == UF_PG_CLEAN && !mapped) {
				ent_set(pt, e, E_MAKE(E_SLOT(v), UF_PG_EVICTED, E_STAMP(v)));
				out[0]++;
			} else if (s == UF_PG_CLEAN) {
				out[5]++;
			}
		}
	}
done:
	pt->nruns = 0;
	pt->nlog = 0;
	persist_batch(pt, 0);
	pthread_mutex_unlock(&pt->lock);
	free(pm);
	free(buf);
	return rc;
}

/* The batch in flight of a fork child's table whose parent died before it read the
 * batch's pages: the child, forked after they were moved, has them in its own copy of
 * the scratch area.  Decides every TRANSIT page from the child's page map (see
 * recover_batch_locked) while its engine serves it, closes the batch and lets the
 * threads waiting on those pages look again.  Only for a table whose batch nobody else
 * will commit (the parent's commit settles its children itself).  out as for
 * uf_pt_recover.  The tables forked from this one during the batch are handed to the
 * caller as the batch closes (their references in kids, their number in *nkids), to be
 * rescued on their own: a commit of this table's own later batch must not touch them.
 * Returns 0, -EAGAIN (pages left waiting: again later), -ENOSPC (more than maxkids
 * children: again with room for *nkids), or -errno (-ESRCH: the child is gone too). */
int uf_pt_rescue(uf_pt *pt, int pid, int pagemap_fd, uint64_t *out, uf_pt **kids, size_t maxkids,
		 size_t *nkids)
{
	char *buf = aligned_alloc(PG, PG);
	int rc;

	memset(out, 0, 6 * sizeof(uint64_t));
	*nkids = 0;
	if (!buf)
		return -ENOMEM;
	pthread_mutex_lock(&pt->lock);
	if (!pt->batch) {
		pthread_mutex_unlock(&pt->lock);
		free(buf);
		return 0;
	}
	rc = recover_batch_locked(pt, pid, pagemap_fd, buf, out);
	if (rc == 0) {
		FOR_BATCH_PAGES(pt, idx, a0) {
			uint64_t *e = ent_at(pt, translate(pt, a0), 0);
			(void)idx;
			if (e && E_STATE(*e) == UF_PG_TRANSIT)
				out[4]++;
		}
		if (!out[4] && pt->nkids > maxkids) {
			*nkids = pt->nkids;
			rc = -ENOSPC;
		} else if (!out[4]) {
			size_t i;
			for (i = 0; i < pt->nkids; i++)
				kids[i] = pt->kids[i];
			*nkids = pt->nkids;
			pt->nkids = 0;
			pt->batch = 0;
			pt->nruns = 0;
			pt->nlog = 0;
			persist_batch(pt, 0);
		}
	}
	pthread_mutex_unlock(&pt->lock);
	free(buf);
	kick(pt);
	return rc < 0 ? rc : out[4] ? -EAGAIN : 0;
}

/* The tables forked from pt while its batch was in flight, and theirs (breadth first).
 * The first max are written to out, each with a reference of its own for the caller
 * (uf_pt_unref); returns how many there are in all (call again with room for that). */
int64_t uf_pt_kid_list(uf_pt *pt, uf_pt **out, size_t max)
{
	uf_pt **all = NULL, *k;
	size_t n = 0, cap = 0, i, j;

	for (i = 0; i <= n; i++) {
		k = i ? all[i - 1] : pt;
		pthread_mutex_lock(&k->lock);
		for (j = 0; j < k->nkids; j++) {
			if (n == cap) {
				size_t nc = cap ? cap * 2 : 8;
				uf_pt **a2 = realloc(all, nc * sizeof(*a2));
				if (!a2)
					break;
				all = a2;
				cap = nc;
			}
			all[n++] = uf_pt_ref(k->kids[j]);
		}
		pthread_mutex_unlock(&k->lock);
		if (j < k->nkids) { /* no memory */
			for (j = 0; j < n; j++)
				uf_pt_unref(all[j]);
			free(all);
			return -ENOMEM;
		}
	}
	for (i = 0; i < n; i++) {
		if (i < max)
			out[i] = all[i];
		else
			uf_pt_unref(all[i]);
	}
	free(all);
	return (int64_t)n;
}

/* Whether pt is bound to a uffd (1: a process's engine serves it) or not (0). */
int uf_pt_bound(uf_pt *pt)
{
	int b;

	pthread_mutex_lock(&pt->lock);
	b = pt->uffd >= 0;
	pthread_mutex_unlock(&pt->lock);
	return b;
}

/* Whether pt has a batch in flight (1) or not (0). */
int uf_pt_batch_open(uf_pt *pt)
{
	int b;

	pthread_mutex_lock(&pt->lock);
	b = pt->batch;
	pthread_mutex_unlock(&pt->lock);
	return b;
}

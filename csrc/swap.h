/* swap.h - what the engine needs from swap.c (not part of the cffi interface). */
#ifndef UFFDIO_SWAP_H
#define UFFDIO_SWAP_H
#include <sys/types.h>
#include "uffdio.h"

enum { SWAP_DONE = 0, SWAP_PARK = 1, SWAP_DEFER = 2, SWAP_PASS = 3 };

/* fa_end: first address above the fault that fault-around must not fill (the start of
 * the next engine rule: those pages are the rule's), UINT64_MAX when none. */
int uf_swap_fault(uf_pt *pt, struct uf_msg *m, void *bufs, int *what, uint64_t fa_end);
void uf_swap_stamp(struct uf_msg *m);
void uf_pt_bind(uf_pt *pt, int uffd, int kick_fd);
void uf_pt_unbind(uf_pt *pt, int uffd);
void uf_pt_event(uf_pt *pt, const struct uf_msg *m);
ssize_t uf_pt_read(uf_pt *pt, int fd, void *buf, size_t len, uf_pt **clones, size_t maxclones,
		   size_t *nclones);
#endif

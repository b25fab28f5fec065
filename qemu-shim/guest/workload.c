/*
 * The test guest's workload: fills memory with realistic content, then keeps dirtying pages at a
 * set rate and prints a line to the console every second.
 *
 *   workload FILL_MIB DIRTY_PAGES_PER_SECOND
 *
 * Memory is filled in extents of one kind at a time, as a running system's memory looks: text,
 * arrays of small integers, heap objects full of pointers, machine code, random (compressed or
 * encrypted) data, untouched (zero) pages, and copies of earlier extents. Every page's content
 * is generated on its own (no templates), so that no compressor finds more redundancy than real
 * memory has; the generators work a word at a time so that filling stays fast under TCG.
 *
 * Each console line says "pagestream-workload tick N dirtied D": a migrated guest that runs on
 * keeps printing them.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

#define PAGE 4096

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static const char *words[] = {
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "be", "on", "not",
    "this", "are", "from", "at", "which", "have", "an", "were", "memory", "page", "system",
    "process", "server", "request", "value", "file", "data", "user", "error", "kernel",
    "thread", "buffer", "service", "config", "return", "function", "migration", "virtual",
    "machine", "storage", "started", "completed", "received", "bytes", "connection",
};
#define NWORDS (sizeof(words) / sizeof(words[0]))

static void fill_text(uint8_t *p) {
    size_t pos = 0;
    while (pos < PAGE) {
        /* Skewed towards the common words. */
        uint64_t u = next() % 1000;
        const char *w = words[(u * u / 1000) * NWORDS / 1000];
        size_t n = strlen(w);
        for (size_t i = 0; i < n && pos < PAGE; i++) p[pos++] = (uint8_t)w[i];
        if (pos < PAGE) p[pos++] = (next() % 12 == 0) ? '\n' : ' ';
    }
}

static void fill_ints(uint8_t *p) {
    uint32_t *w = (uint32_t *)p;
    uint32_t v = (uint32_t)(next() % 1000);
    for (int i = 0; i < PAGE / 4; i++) {
        v += (uint32_t)(next() % 8);
        w[i] = (i % 3 == 0) ? v : (uint32_t)(next() % 64);
    }
}

static void fill_pointers(uint8_t *p) {
    uint64_t *w = (uint64_t *)p;
    uint64_t base = 0xffff888000000000ULL + ((next() % (1 << 20)) << 12);
    for (int i = 0; i < PAGE / 8; i++) {
        switch (i % 6) {
        case 0: case 1: w[i] = base + ((next() % (1 << 22)) & ~0xfULL); break;
        case 2: w[i] = next() % 32; break;
        case 3: w[i] = (next() & 1) ? base + (next() % 65536) * 16 : 0; break;
        case 4: w[i] = next() % 65536; break;
        default: w[i] = 0;
        }
    }
}

static void fill_code(uint8_t *p) {
    static const uint8_t ops[][5] = {
        {0x48, 0x89, 0xe5, 0, 3}, {0x55, 0, 0, 0, 1}, {0xc3, 0, 0, 0, 1},
        {0x48, 0x8b, 0x45, 0xf8, 4}, {0xe8, 0, 0, 0, 5}, {0x74, 0x10, 0, 0, 2},
        {0x31, 0xc0, 0, 0, 2}, {0x0f, 0x1f, 0x44, 0x00, 5}, {0x48, 0x83, 0xec, 0x20, 4},
    };
    size_t pos = 0;
    while (pos < PAGE) {
        const uint8_t *op = ops[next() % 9];
        uint8_t len = op[4];
        for (int i = 0; i < len && pos < PAGE; i++)
            p[pos++] = (i < 4 && op[i]) ? op[i] : (uint8_t)(next() & 0xff);
    }
}

static void fill_random(uint8_t *p) {
    uint64_t *w = (uint64_t *)p;
    for (int i = 0; i < PAGE / 8; i++) w[i] = next();
}

int main(int argc, char **argv) {
    long fill_mib = argc > 1 ? atol(argv[1]) : 64;
    long rate = argc > 2 ? atol(argv[2]) : 1000;
    size_t pages = (size_t)fill_mib * 256;
    uint8_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("pagestream-workload: mmap");
        return 1;
    }
    void (*fill[5])(uint8_t *) = {fill_text, fill_ints, fill_pointers, fill_code, fill_random};

    /* Kinds and their shares (percent of extents): text, ints, pointers, code, random, zero, dup. */
    static const int share[7] = {18, 14, 14, 12, 8, 22, 12};
    size_t page = 0;
    while (page < pages) {
        int r = (int)(next() % 100), kind = 0;
        while (r >= share[kind]) r -= share[kind++];
        size_t len = 1 + next() % 256;
        if (len > pages - page) len = pages - page;
        for (size_t i = 0; i < len; i++) {
            uint8_t *p = mem + (page + i) * PAGE;
            if (kind < 5) {
                fill[kind](p);
            } else if (kind == 5) {
                /* Free memory: touched (so it is allocated) but zero. */
                p[0] = 0;
            } else if (page > 0) {
                memcpy(p, mem + (next() % page) * PAGE, PAGE);
            }
        }
        page += len;
    }
    printf("pagestream-workload filled %ld MiB, dirtying %ld pages/s\n", fill_mib, rate);
    fflush(stdout);

    /* Dirty pages: 80% in a hot eighth of memory, as programs do. */
    size_t hot = pages / 8 > 0 ? pages / 8 : 1;
    uint64_t tick = 0, dirtied = 0;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    double last_print = 0;
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        double t = (double)(now.tv_sec - start.tv_sec) + (double)(now.tv_nsec - start.tv_nsec) / 1e9;
        uint64_t due = (uint64_t)(t * (double)rate);
        while (dirtied < due) {
            size_t i = (next() % 10 < 8) ? next() % hot : next() % pages;
            uint64_t *w = (uint64_t *)(mem + i * PAGE);
            w[next() % (PAGE / 8)] += 1 + next() % 7;
            dirtied++;
        }
        if (t - last_print >= 1.0) {
            last_print = t;
            printf("pagestream-workload tick %llu dirtied %llu\n", (unsigned long long)++tick,
                   (unsigned long long)dirtied);
            fflush(stdout);
        }
        usleep(2000);
    }
}

// Selection by score: the order every choice is made in (order_key), the radix select of the k-th
// highest key (kth_key), and taking the k best of a set of candidates (take_best).
//
// The order of choice, the contract the NumPy reference shares: highest score first, ties: lower slot index
// first. Scores are doubles, ranked through their bits as unsigned keys in the same order.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

namespace edge {

// A double's bits as an unsigned key in the same order (-0 and +0 made one, as == has them).
inline uint64_t order_key(double x) {
    x += 0.0;  // -0 -> +0
    uint64_t b;
    std::memcpy(&b, &x, 8);
    return (b >> 63) ? ~b : b | (uint64_t(1) << 63);
}

// The k-th highest of keys[0..n) (1 <= k < n) and how many keys lie strictly above it. A radix select: 8
// bits a round, from the highest byte in which the keys differ, each round on the survivors of the last
// (in scratch, n entries); a few survivors are finished by nth_element.
struct Kth {
    uint64_t key;
    size_t above;
};

inline Kth kth_key(const uint64_t *keys, size_t n, size_t k, uint64_t *scratch) {
    uint64_t all_or = 0, all_and = ~uint64_t(0);
    for (size_t i = 0; i < n; ++i) all_or |= keys[i], all_and &= keys[i];
    const uint64_t differ = all_or ^ all_and;
    if (differ == 0) return {keys[0], 0};
    int shift = 0;
    while (shift < 56 && (differ >> (shift + 8)) != 0) shift += 8;
    const uint64_t *cur = keys;
    size_t m = n, kk = k;  // the threshold is the kk-th highest of cur[0..m)
    for (;; shift -= 8) {
        if (m <= 32) {
            std::copy(cur, cur + m, scratch);
            std::nth_element(scratch, scratch + (kk - 1), scratch + m, std::greater<uint64_t>());
            const uint64_t t = scratch[kk - 1];
            size_t above = k - kk;
            for (size_t i = 0; i < m; ++i) above += scratch[i] > t;
            return {t, above};
        }
        // Two histograms, even and odd entries: runs of one bucket do not wait on their own counts.
        uint32_t hist[2][256] = {};
        size_t i = 0;
        for (; i + 2 <= m; i += 2) {
            ++hist[0][(cur[i] >> shift) & 255];
            ++hist[1][(cur[i + 1] >> shift) & 255];
        }
        if (i < m) ++hist[0][(cur[i] >> shift) & 255];
        int bucket = 255;
        for (; hist[0][bucket] + hist[1][bucket] < kk; --bucket) kk -= hist[0][bucket] + hist[1][bucket];
        size_t w = 0;
        for (i = 0; i < m; ++i) {
            scratch[w] = cur[i];  // w <= i: in place once cur is scratch
            w += int((cur[i] >> shift) & 255) == bucket;
        }
        cur = scratch;
        m = w;
        if (m == 1 || shift == 0) return {cur[0], k - kk};  // every survivor equals the threshold
    }
}

// Mark the k best of the nc candidates (key[i], slot[i]; slot order): all above the k-th key and, of
// those equal to it, the first met. With `next`, the others stay candidates, in slot order, keyed by
// next[slot]; returns how many. radix: kth_key's scratch (nc entries).
inline size_t take_best(uint64_t *key, int32_t *slot, uint64_t *radix, uint8_t *mark, size_t nc, size_t k,
                        const double *next) {
    Kth t{~uint64_t(0), 0};  // k = 0: none taken
    if (k >= nc && nc > 0)
        t = {0, 0}, k = nc;  // all taken
    else if (k > 0)
        t = kth_key(key, nc, k, radix);
    size_t ties = k - t.above, m = 0;
    for (size_t i = 0; i < nc; ++i) {
        const size_t tie = key[i] == t.key && ties > 0;
        const size_t take = (key[i] > t.key) | tie;
        ties -= tie;
        mark[size_t(slot[i])] |= uint8_t(take);
        if (next) {
            key[m] = order_key(next[slot[i]]);  // m <= i: never overwrites one not yet seen
            slot[m] = slot[i];
            m += 1 - take;
        }
    }
    return m;
}

}  // namespace edge

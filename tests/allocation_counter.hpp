// Replaces the global operator new to count allocations, so a test can
// check that a path does not allocate. Include it in ONE file of a test
// binary (each test file is its own binary here). Test code only.
#pragma once

#include <atomic>
#include <cstdlib>
#include <new>

namespace aet_test {
inline std::atomic<long> allocations{0};
// While >= 0: the allocation that would make `allocations` exceed it
// throws std::bad_alloc instead (for out-of-memory tests).
inline std::atomic<long> fail_after{-1};
}

// GCC 12 at -O2 inlines these and then warns about free() of a pointer that
// came from new; the pairing is ours and consistent.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t size) {
  const long limit = aet_test::fail_after.load();
  if (limit >= 0 && aet_test::allocations.load() >= limit) throw std::bad_alloc();
  ++aet_test::allocations;
  if (void* p = std::malloc(size ? size : 1)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  const long limit = aet_test::fail_after.load();
  if (limit >= 0 && aet_test::allocations.load() >= limit) return nullptr;
  ++aet_test::allocations;
  return std::malloc(size ? size : 1);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

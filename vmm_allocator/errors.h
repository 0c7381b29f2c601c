// Exception types of the extension. Each maps to a Python exception class of the same name in
// glakeserve._vmm (see bindings.cpp); all derive from VmmError, itself a RuntimeError.
#pragma once
#include <stdexcept>
#include <string>

namespace glake {

struct VmmError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The pool has fewer free physical pages than an operation needs.
struct PoolExhaustedError : VmmError {
  using VmmError::VmmError;
};
// A page range that lies (partly) outside a vTensor's reservation, or an unknown vTensor.
struct OutOfRangeError : VmmError {
  using VmmError::VmmError;
};
// Mapping a virtual page that already has a physical page behind it.
struct AlreadyMappedError : VmmError {
  using VmmError::VmmError;
};
// Unmapping (or aliasing from) a virtual page that has no physical page behind it.
struct NotMappedError : VmmError {
  using VmmError::VmmError;
};
// A driver (CUDA) or kernel (mmap, memfd) call failed; the message names the call and the code.
struct DriverError : VmmError {
  using VmmError::VmmError;
};
// The requested backend cannot run on this machine (no libcuda, no GPU).
struct BackendUnavailableError : VmmError {
  using VmmError::VmmError;
};

}  // namespace glake

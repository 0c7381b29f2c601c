// Python bindings: glakeserve._vmm. Every call that takes the allocator's lock or blocks on the
// worker releases the GIL, so the worker and other Python threads keep running.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "allocator.h"
#include "dlpack_view.h"
#include "errors.h"

namespace py = pybind11;
using namespace glake;

namespace {

std::vector<PageRange> to_ranges(const std::vector<std::tuple<int64_t, int64_t, int64_t>>& items) {
  std::vector<PageRange> out;
  out.reserve(items.size());
  for (const auto& [vt, first, count] : items) out.push_back({vt, first, count});
  return out;
}

py::dict stats_dict(const PoolStats& s) {
  py::dict d;
  d["backend"] = s.backend;
  d["device"] = s.device;
  d["page_size"] = s.page_size;
  d["total_pages"] = s.total_pages;
  d["free_pages"] = s.free_pages;
  d["used_pages"] = s.used_pages;
  d["shared_pages"] = s.shared_pages;
  d["mappings"] = s.mappings;
  d["num_vtensors"] = s.num_vtensors;
  d["reserved_bytes"] = s.reserved_bytes;
  d["pages_mapped"] = s.pages_mapped;
  d["pages_unmapped"] = s.pages_unmapped;
  d["pages_aliased"] = s.pages_aliased;
  d["set_access_calls"] = s.set_access_calls;
  d["pages_created"] = s.pages_created;
  d["pages_released"] = s.pages_released;
  d["sync_driver_calls"] = s.sync_driver_calls;
  d["async_jobs"] = s.async_jobs;
  d["async_pages"] = s.async_pages;
  d["waits"] = s.waits;
  d["wait_seconds"] = s.wait_seconds;
  d["map_seconds"] = s.map_seconds;
  d["set_access_seconds"] = s.set_access_seconds;
  d["unmap_seconds"] = s.unmap_seconds;
  return d;
}

py::dict info_dict(const VTensorInfo& i) {
  py::dict d;
  d["id"] = i.id;
  d["address"] = i.address;
  d["reserved_bytes"] = i.reserved_bytes;
  d["num_pages"] = i.num_pages;
  d["mapped_pages"] = i.mapped_pages;
  d["physical_pages"] = i.physical_pages;
  d["shared_pages"] = i.shared_pages;
  d["pending_jobs"] = i.pending_jobs;
  return d;
}

// A queued job as Python sees it: poll with done(), block with wait().
struct MapFuture {
  std::shared_ptr<Allocator> allocator;
  std::shared_ptr<Job> job;
  bool done() {
    std::lock_guard<std::mutex> lock(job->mu);
    return job->done;
  }
};

}  // namespace

PYBIND11_MODULE(_vmm, m) {
  m.doc() = "GlakeServe virtual memory allocator: a page pool, vTensors, and an async mapping worker.";

  auto vmm_error = py::register_exception<VmmError>(m, "VmmError", PyExc_RuntimeError);
  py::register_exception<PoolExhaustedError>(m, "PoolExhaustedError", vmm_error);
  py::register_exception<OutOfRangeError>(m, "OutOfRangeError", vmm_error);
  py::register_exception<AlreadyMappedError>(m, "AlreadyMappedError", vmm_error);
  py::register_exception<NotMappedError>(m, "NotMappedError", vmm_error);
  py::register_exception<DriverError>(m, "DriverError", vmm_error);
  py::register_exception<BackendUnavailableError>(m, "BackendUnavailableError", vmm_error);

  m.def("cuda_available", &cuda_backend_available, py::call_guard<py::gil_scoped_release>(),
        "Whether the cuda backend can run here (libcuda loads and reports a device).");

  py::class_<MapFuture>(m, "MapFuture")
      .def("done", &MapFuture::done, py::call_guard<py::gil_scoped_release>(),
           "True once the worker has executed the job (successfully or not).")
      .def(
          "wait", [](MapFuture& f) { f.allocator->wait(f.job); }, py::call_guard<py::gil_scoped_release>(),
          "Blocks until the job ran; raises the job's error, if any. Counted in stats()['waits'] when it blocks.")
      .def_property_readonly("pages", [](const MapFuture& f) { return f.job->pages; });

  py::class_<Allocator, std::shared_ptr<Allocator>>(m, "Allocator")
      .def(py::init<const std::string&, int, size_t, int64_t>(), py::arg("backend") = "auto",
           py::arg("device") = 0, py::arg("page_size") = 0, py::arg("num_pages") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("close", &Allocator::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("closed", &Allocator::closed)
      .def_property_readonly("backend", &Allocator::backend_name)
      .def_property_readonly("page_size", &Allocator::page_size)
      .def_property_readonly("dlpack_device_type", &Allocator::dlpack_device_type)
      .def_property_readonly("device_id", &Allocator::device_id)
      .def(
          "memory_info",
          [](Allocator& a) {
            MemoryInfo info;
            {
              py::gil_scoped_release release;
              info = a.memory_info();
            }
            return py::make_tuple(info.free_bytes, info.total_bytes);
          },
          "(free_bytes, total_bytes) of the device (cuda) or of the machine (host).")
      .def("reserve", &Allocator::reserve, py::arg("nbytes"), py::call_guard<py::gil_scoped_release>())
      .def("release", &Allocator::release, py::arg("vtensor"), py::call_guard<py::gil_scoped_release>())
      .def(
          "map", [](Allocator& a, const std::vector<std::tuple<int64_t, int64_t, int64_t>>& items) {
            auto ranges = to_ranges(items);
            py::gil_scoped_release release;
            a.map(ranges);
          },
          py::arg("ranges"), "Maps fresh pool pages at each (vtensor, first_page, count); all or nothing.")
      .def(
          "unmap", [](Allocator& a, const std::vector<std::tuple<int64_t, int64_t, int64_t>>& items) {
            auto ranges = to_ranges(items);
            py::gil_scoped_release release;
            a.unmap(ranges);
          },
          py::arg("ranges"))
      .def(
          "alias",
          [](Allocator& a, const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>>& items) {
            std::vector<AliasRange> ranges;
            for (const auto& [dst, dst_first, src, src_first, count] : items) {
              ranges.push_back({dst, dst_first, src, src_first, count});
            }
            py::gil_scoped_release release;
            a.alias(ranges);
          },
          py::arg("ranges"), "Maps src's pages again at dst: each item is (dst, dst_first, src, src_first, count).")
      .def(
          "submit",
          [](std::shared_ptr<Allocator> a, const std::string& kind,
             const std::vector<std::tuple<int64_t, int64_t, int64_t>>& ranges,
             const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>>& aliases, int64_t grow_pages,
             uintptr_t after_event) {
            JobKind k;
            if (kind == "map") {
              k = JobKind::kMap;
            } else if (kind == "unmap") {
              k = JobKind::kUnmap;
            } else if (kind == "alias") {
              k = JobKind::kAlias;
            } else if (kind == "grow") {
              k = JobKind::kGrow;
            } else {
              throw std::invalid_argument("unknown job kind '" + kind + "': use 'map', 'unmap', 'alias' or 'grow'");
            }
            std::vector<AliasRange> alias_ranges;
            for (const auto& [dst, dst_first, src, src_first, count] : aliases) {
              alias_ranges.push_back({dst, dst_first, src, src_first, count});
            }
            auto page_ranges = to_ranges(ranges);
            std::shared_ptr<Job> job;
            {
              py::gil_scoped_release release;
              job = a->submit(k, std::move(page_ranges), std::move(alias_ranges), grow_pages, after_event);
            }
            return MapFuture{a, job};
          },
          py::arg("kind"), py::arg("ranges") = std::vector<std::tuple<int64_t, int64_t, int64_t>>{},
          py::arg("aliases") = std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>>{},
          py::arg("grow_pages") = 0, py::arg("after_event") = 0,
          "Queues a job for the worker thread: map / unmap (ranges), alias (aliases) or grow (grow_pages). "
          "after_event: a device event (CUevent handle) the worker waits for before the job's driver calls.")
      .def("grow", &Allocator::grow, py::arg("pages"), py::call_guard<py::gil_scoped_release>())
      .def("shrink", &Allocator::shrink, py::arg("pages"), py::call_guard<py::gil_scoped_release>())
      .def("stats", [](Allocator& a) {
        PoolStats s;
        {
          py::gil_scoped_release release;
          s = a.stats();
        }
        return stats_dict(s);
      })
      .def("snapshot",
           [](Allocator& a) {
             Allocator::Snapshot snap;
             {
               py::gil_scoped_release release;
               snap = a.snapshot();
             }
             py::list infos;
             for (const auto& i : snap.vtensors) infos.append(info_dict(i));
             return py::make_tuple(stats_dict(snap.stats), infos, snap.refcounts);
           },
           "(stats, [info per vTensor], page refcounts), read under one lock.")
      .def(
          "info",
          [](Allocator& a, int64_t vt) {
            VTensorInfo i;
            {
              py::gil_scoped_release release;
              i = a.info(vt);
            }
            return info_dict(i);
          },
          py::arg("vtensor"))
      .def("free_pages", &Allocator::free_pages, py::call_guard<py::gil_scoped_release>())
      .def("vtensor_ids", &Allocator::vtensor_ids, py::call_guard<py::gil_scoped_release>())
      .def("page_refcounts", &Allocator::page_refcounts, py::call_guard<py::gil_scoped_release>(),
           "Mappings per pool page; None for page ids whose physical page was released.")
      .def(
          "dlpack",
          [](Allocator& a, int64_t vt) {
            std::shared_ptr<Reservation> r;
            {
              py::gil_scoped_release release;
              r = a.reservation(vt);
            }
            return make_dlpack_capsule(r, a.dlpack_device_type(), a.device_id());
          },
          py::arg("vtensor"), "A DLPack capsule: the vTensor's whole reservation as a 1-D uint8 tensor.");
}

// Communicator over any c10d ProcessGroup (gloo on CPU, NCCL on CUDA): the generic backend.
#include "comm/c10d.h"

#include "comm/virtual.h"

#include <sstream>

#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/debug.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace tpext::comm {
namespace {

class C10dPending final : public Pending {
 public:
  explicit C10dPending(c10::intrusive_ptr<c10d::Work> work) : work_(std::move(work)) {}
  // Work::wait raises on a failed or timed-out collective (the group's timeout), never hangs past it.
  void wait() override { work_->wait(); }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
};

class C10dCommunicator final : public Communicator {
 public:
  explicit C10dCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> pg) : pg_(std::move(pg)) {}

  int rank() const override { return pg_->getRank(); }
  int size() const override { return pg_->getSize(); }

  PendingPtr all_reduce(at::Tensor& buf) override {
    std::vector<at::Tensor> tensors{buf};
    return std::make_unique<C10dPending>(pg_->allreduce(tensors));
  }

  // _reduce_scatter_base is deprecated in newer torch for reduce_scatter_single, which older releases
  // (2.11, on the GPU machines) lack; it is the one call both have.
  PendingPtr reduce_scatter(at::Tensor& out, at::Tensor& in) override {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    return std::make_unique<C10dPending>(pg_->_reduce_scatter_base(out, in));
#pragma GCC diagnostic pop
  }

  PendingPtr all_gather(std::vector<at::Tensor>& outs, at::Tensor& in) override {
    std::vector<std::vector<at::Tensor>> out_lists{outs};
    std::vector<at::Tensor> ins{in};
    return std::make_unique<C10dPending>(pg_->allgather(out_lists, ins));
  }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;  // shared with torch.distributed; kept alive while in use
};

// A group of one: every collective is the identity, so no backend call is made at all (the
// "world size 1 takes the local path" rule). Copies only where the output is a different buffer.
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  bool local() const override { return true; }
  PendingPtr all_reduce(at::Tensor&) override { return std::make_unique<Done>(); }
  PendingPtr reduce_scatter(at::Tensor& out, at::Tensor& in) override {
    out.copy_(in);
    return std::make_unique<Done>();
  }
  PendingPtr all_gather(std::vector<at::Tensor>& outs, at::Tensor& in) override {
    outs.at(0).copy_(in);
    return std::make_unique<Done>();
  }

 private:
  struct Done final : Pending {
    void wait() override {}
  };
};

}  // namespace

c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const std::string& group_name, const char* op) {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  try {
    pg = c10d::resolve_process_group(group_name);
  } catch (const c10::Error&) {
    pg.reset();
  }
  TORCH_CHECK(pg, "tpext.", op, ": group_name '", group_name,
              "' does not name a registered process group; pass ProcessGroup.group_name of a group made "
              "by torch.distributed (or use the tpext.ops wrappers, which take the group itself)");
  return pg;
}

std::unique_ptr<Communicator> make_local_communicator() { return std::make_unique<LocalCommunicator>(); }

int64_t group_size(const std::string& group_name, const char* op) {
  if (const int64_t virtual_size = virtual_group_size(group_name); virtual_size >= 0) return virtual_size;
  return resolve_group(group_name, op)->getSize();
}

void check_ranks_agree(const std::string& group_name, const char* op, const c10::Device& device,
                       const std::vector<std::pair<const char*, int64_t>>& fields) {
  if (c10d::debug_level() < c10d::DebugLevel::Detail || virtual_group_size(group_name) >= 0) return;
  auto pg = resolve_group(group_name, op);
  const int world = pg->getSize();
  if (world == 1) return;
  std::vector<int64_t> mine;
  for (const auto& field : fields) mine.push_back(field.second);
  const auto n = static_cast<int64_t>(mine.size());
  at::Tensor in = at::tensor(mine, at::TensorOptions().dtype(at::kLong)).to(device);
  std::vector<at::Tensor> outs;
  for (int r = 0; r < world; ++r) outs.push_back(at::empty({n}, in.options()));
  C10dCommunicator(pg).all_gather(outs, in)->wait();
  std::ostringstream differ;
  const at::Tensor first = outs[0].cpu();
  for (int r = 1; r < world; ++r) {
    const at::Tensor theirs = outs[r].cpu();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t a = first[i].item<int64_t>(), b = theirs[i].item<int64_t>();
      if (a == b) continue;
      const bool dtype = std::string(fields[i].first) == "dtype";
      const auto show = [dtype](int64_t v) {
        return dtype ? std::string(c10::toString(static_cast<at::ScalarType>(v))) : std::to_string(v);
      };
      differ << " " << fields[i].first << " = " << show(b) << " on rank " << r << " but " << show(a) << " on rank 0;";
    }
  }
  TORCH_CHECK(differ.str().empty(), "tpext.", op, ": the ranks of group '", group_name,
              "' called it with different arguments (checked because TORCH_DISTRIBUTED_DEBUG=DETAIL):", differ.str(),
              " every rank must pass the same shapes, dtype and schedule");
}

std::unique_ptr<Communicator> make_c10d_communicator(const std::string& group_name, const char* op) {
  auto pg = resolve_group(group_name, op);
  if (pg->getSize() == 1) return std::make_unique<LocalCommunicator>();
  return std::make_unique<C10dCommunicator>(std::move(pg));
}

}  // namespace tpext::comm

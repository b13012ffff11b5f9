#include "comm/virtual.h"

#include <condition_variable>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <c10/util/Exception.h>

#ifdef TPEXT_WITH_CUDA
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/cuda_streams.h"
#endif

namespace tpext::comm {
namespace {

constexpr const char* kPrefix = "tpext-virtual/";

enum class Kind { kAllReduce, kReduceScatter, kAllGather };

#ifdef TPEXT_WITH_CUDA
using EventPtr = std::shared_ptr<c10::cuda::CUDAEvent>;
#else
using EventPtr = std::shared_ptr<void>;
#endif

struct Slot {
  Kind kind;
  at::Tensor in;                 // all_reduce: the buffer; reduce_scatter / all_gather: the input
  std::vector<at::Tensor> outs;  // reduce_scatter: {out}; all_gather: one per source rank
  EventPtr ready;                // CUDA: recorded on the rank's current stream at the call
};

class Hub {
 public:
  explicit Hub(int64_t world) : world_(world), slots_(world) {}
  int64_t size() const { return world_; }

  // Rendezvous; returns the completion event of this collective (null on CPU: already complete).
  EventPtr collective(int64_t rank, Slot slot) {
    std::unique_lock<std::mutex> lock(mu_);
    TORCH_CHECK(!aborted_, "tpext: virtual group aborted: ", why_);
    slots_[rank] = std::move(slot);
    const int64_t generation = generation_;
    if (++arrived_ == world_) {
      arrived_ = 0;
      try {
        done_ = execute();
      } catch (const std::exception& e) {
        abort_locked(e.what());
        throw;
      }
      for (Slot& s : slots_) s = Slot{};
      ++generation_;
      cv_.notify_all();
      return done_;
    }
    cv_.wait(lock, [&] { return generation_ != generation || aborted_; });
    TORCH_CHECK(generation_ != generation, "tpext: virtual group aborted: ", why_);
    return done_;  // only the next generation could replace it, and it needs this rank
  }

  void abort(const std::string& why) {
    std::lock_guard<std::mutex> lock(mu_);
    abort_locked(why);
  }

 private:
  void abort_locked(const std::string& why) {
    if (!aborted_) why_ = why;
    aborted_ = true;
    cv_.notify_all();
  }

  EventPtr execute() {
    const Slot& first = slots_[0];
    for (int64_t r = 1; r < world_; ++r) {
      TORCH_CHECK(slots_[r].kind == first.kind && slots_[r].in.sizes() == first.in.sizes(),
                  "tpext: virtual ranks issued different collectives (rank 0 and rank ", r,
                  " disagree on kind or size): the schedules diverged");
    }
#ifdef TPEXT_WITH_CUDA
    if (first.in.is_cuda()) {
      const auto device = first.in.device().index();
      auto stream = cuda::comm_stream(device);
      for (const Slot& s : slots_) s.ready->block(stream);
      {
        c10::cuda::CUDAStreamGuard guard(stream);
        reduce();
      }
      auto done = std::make_shared<c10::cuda::CUDAEvent>();
      done->record(stream);
      return done;
    }
#endif
    reduce();
    return nullptr;
  }

  // Sums in rank order: every rank's result has identical bits.
  void reduce() {
    switch (slots_[0].kind) {
      case Kind::kAllReduce: {
        at::Tensor sum = slots_[0].in.clone();
        for (int64_t r = 1; r < world_; ++r) sum.add_(slots_[r].in);
        for (Slot& s : slots_) s.in.copy_(sum);
        break;
      }
      case Kind::kReduceScatter:
        for (int64_t dst = 0; dst < world_; ++dst) {
          at::Tensor acc = slots_[0].in.view({world_, -1}).select(0, dst).clone();
          for (int64_t r = 1; r < world_; ++r) acc.add_(slots_[r].in.view({world_, -1}).select(0, dst));
          slots_[dst].outs.at(0).view(-1).copy_(acc);
        }
        break;
      case Kind::kAllGather:
        for (Slot& s : slots_) {
          for (int64_t src = 0; src < world_; ++src) s.outs.at(src).copy_(slots_[src].in);
        }
        break;
    }
  }

  const int64_t world_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Slot> slots_;
  int64_t arrived_ = 0, generation_ = 0;
  EventPtr done_;
  bool aborted_ = false;
  std::string why_;
};

class VirtualPending final : public Pending {
 public:
  explicit VirtualPending(EventPtr done) : done_(std::move(done)) {}
  void wait() override {
#ifdef TPEXT_WITH_CUDA
    if (done_) done_->block(c10::cuda::getCurrentCUDAStream(done_->device_index()));
#endif
    waited_ = true;
  }
  // As NcclPending: one dropped without wait() still orders the current stream after the collective.
  ~VirtualPending() override {
    if (waited_) return;
    try {
      wait();
    } catch (...) {  // NOLINT(bugprone-empty-catch): a destructor cannot report; the first error is propagating
    }
  }

 private:
  EventPtr done_;
  bool waited_ = false;
};

class VirtualCommunicator final : public Communicator {
 public:
  VirtualCommunicator(std::shared_ptr<Hub> hub, int64_t rank) : hub_(std::move(hub)), rank_(rank) {}
  int rank() const override { return static_cast<int>(rank_); }
  int size() const override { return static_cast<int>(hub_->size()); }

  PendingPtr all_reduce(at::Tensor& buf) override { return call({Kind::kAllReduce, buf, {}, ready(buf)}); }
  PendingPtr reduce_scatter(at::Tensor& out, at::Tensor& in) override {
    return call({Kind::kReduceScatter, in, {out}, ready(in)});
  }
  PendingPtr all_gather(std::vector<at::Tensor>& outs, at::Tensor& in) override {
    return call({Kind::kAllGather, in, outs, ready(in)});
  }

 private:
  static EventPtr ready(const at::Tensor& t) {
#ifdef TPEXT_WITH_CUDA
    if (t.is_cuda()) {
      auto e = std::make_shared<c10::cuda::CUDAEvent>();
      e->record(c10::cuda::getCurrentCUDAStream(t.device().index()));
      return e;
    }
#endif
    (void)t;
    return nullptr;
  }
  PendingPtr call(Slot slot) { return std::make_unique<VirtualPending>(hub_->collective(rank_, std::move(slot))); }

  std::shared_ptr<Hub> hub_;
  int64_t rank_;
};

struct Registry {
  std::mutex mu;
  std::unordered_map<int64_t, std::shared_ptr<Hub>> hubs;
  int64_t next_id = 0;
};

Registry& registry() {
  static auto* r = new Registry();  // leaked on purpose: no teardown-order hazards at exit
  return *r;
}

// "tpext-virtual/<id>/<rank>" -> (id, rank); false for any other name.
bool parse(const std::string& name, int64_t* id, int64_t* rank) {
  if (name.rfind(kPrefix, 0) != 0) return false;
  const std::string rest = name.substr(std::char_traits<char>::length(kPrefix));
  const auto slash = rest.find('/');
  TORCH_CHECK(slash != std::string::npos, "tpext: malformed virtual group name '", name, "'");
  *id = std::stoll(rest.substr(0, slash));
  *rank = std::stoll(rest.substr(slash + 1));
  return true;
}

std::shared_ptr<Hub> hub_of(const std::string& name, int64_t* rank) {
  int64_t id = 0;
  if (!parse(name, &id, rank)) return nullptr;
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.hubs.find(id);
  TORCH_CHECK(it != r.hubs.end(), "tpext: virtual group '", name, "' was released or never made");
  TORCH_CHECK(*rank >= 0 && *rank < it->second->size(), "tpext: rank ", *rank, " out of range in '", name, "'");
  return it->second;
}

}  // namespace

std::vector<std::string> make_virtual_group(int64_t world_size) {
  TORCH_CHECK(world_size >= 1, "tpext: a virtual group needs world_size >= 1, got ", world_size);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  const int64_t id = r.next_id++;
  r.hubs.emplace(id, std::make_shared<Hub>(world_size));
  std::vector<std::string> names;
  for (int64_t rank = 0; rank < world_size; ++rank) {
    names.push_back(kPrefix + std::to_string(id) + "/" + std::to_string(rank));
  }
  return names;
}

void release_virtual_group(const std::string& any_rank_name) {
  int64_t id = 0, rank = 0;
  if (!parse(any_rank_name, &id, &rank)) return;
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.hubs.erase(id);
}

void abort_virtual_group(const std::string& name, const std::string& why) {
  int64_t rank = 0;
  if (auto hub = hub_of(name, &rank)) hub->abort(why);
}

std::unique_ptr<Communicator> make_virtual_communicator(const std::string& name) {
  int64_t rank = 0;
  auto hub = hub_of(name, &rank);
  if (!hub) return nullptr;
  return std::make_unique<VirtualCommunicator>(std::move(hub), rank);
}

int64_t virtual_group_size(const std::string& name) {
  int64_t rank = 0;
  auto hub = hub_of(name, &rank);
  return hub ? hub->size() : -1;
}

}  // namespace tpext::comm

// SlabPool / SlabReceiver: the ownership rules of detail/shm_slabs.h, both sides in
// one process (the receiver maps the memfd a second time, as another process
// would), plus fork().
#include "torch_lmdb/detail/shm_slabs.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>

namespace {

using torch_lmdb::SlabPool;
using torch_lmdb::SlabReceiver;
using torch_lmdb::SlabTicket;

// What a DataLoader does with a ticket: the fd crosses as a duplicate.
at::Tensor carry(SlabReceiver& receiver, const SlabTicket& t) {
  if (t.fd >= 0) receiver.attach(t.pid, t.slab, ::dup(t.fd));
  return receiver.receive(t);
}

at::Tensor filled(SlabPool& pool, int64_t n, float first) {
  at::Tensor t = pool.allocate({n, 4}, at::kFloat);
  EXPECT_TRUE(t.defined());
  t.copy_(at::arange(first, first + n * 4, at::kFloat).view({n, 4}));
  return t;
}

TEST(ShmSlabs, ReceivedTensorViewsTheSlabAndFreesItWhenBothSidesDrop) {
  SlabPool pool(1);
  SlabReceiver receiver;
  at::Tensor produced = filled(pool, 8, 0);
  EXPECT_TRUE(pool.owns(produced));
  EXPECT_FALSE(pool.owns(at::zeros({8, 4})));
  auto ticket = pool.send(produced);
  ASSERT_TRUE(ticket.has_value());
  EXPECT_GE(ticket->fd, 0);
  EXPECT_EQ(ticket->generation, 1u);
  at::Tensor got = carry(receiver, *ticket);
  EXPECT_TRUE(at::equal(got, at::arange(32, at::kFloat).view({8, 4})));
  // Shared memory, not a copy: the producer's write is seen by the receiver.
  produced[0][0] = 100;
  EXPECT_EQ(got[0][0].item<float>(), 100);

  produced.reset();
  EXPECT_EQ(pool.busy(), 1u) << "the receiver still holds it";
  EXPECT_FALSE(pool.allocate({8, 4}, at::kFloat).defined()) << "one slab, and it is held";
  got.reset();
  EXPECT_EQ(pool.busy(), 0u);
  at::Tensor again = pool.allocate({8, 4}, at::kFloat);
  ASSERT_TRUE(again.defined());
  auto second = pool.send(again);
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->slab, ticket->slab);
  EXPECT_EQ(second->generation, 2u) << "each acquire is a new generation";
  EXPECT_EQ(second->fd, -1) << "the fd crosses once per slab";
  at::Tensor got2 = receiver.receive(*second);
  at::Tensor same = receiver.receive(*second);
  EXPECT_EQ(same.data_ptr(), got2.data_ptr()) << "a ticket received again while alive shares the storage";
}

TEST(ShmSlabs, AnUnsentTensorFreesItsSlabWhenDropped) {
  SlabPool pool(1);
  at::Tensor t = filled(pool, 2, 0);
  EXPECT_EQ(pool.busy(), 1u);
  at::Tensor doubled = t * 2;  // arithmetic on a slab tensor makes an ordinary tensor
  EXPECT_FALSE(pool.owns(doubled));
  t.reset();
  EXPECT_EQ(pool.busy(), 0u);
  EXPECT_TRUE(at::equal(doubled, at::arange(8, at::kFloat).view({2, 4}) * 2));
}

TEST(ShmSlabs, ViewsCrossWithTheirOffsetsAndStrides) {
  SlabPool pool(2);
  SlabReceiver receiver;
  at::Tensor base = filled(pool, 6, 0);
  at::Tensor view = base.narrow(0, 2, 3).select(1, 1);  // offset 9, stride 4
  at::Tensor got = carry(receiver, *pool.send(view));
  EXPECT_TRUE(at::equal(got, view));
  // A second ticket of the same generation while the first is alive shares its storage.
  at::Tensor whole = receiver.receive(*pool.send(base));
  EXPECT_EQ(whole.storage().data(), got.storage().data());
  EXPECT_TRUE(at::equal(whole, base));
}

TEST(ShmSlabs, ReleasedOrMalformedTicketsAreRefusedAndClaimNothing) {
  SlabPool pool(1);
  SlabReceiver receiver;
  at::Tensor produced = filled(pool, 4, 0);
  SlabTicket ticket = *pool.send(produced);
  const int fd = ticket.fd;
  ticket.fd = -1;
  try {
    receiver.receive(ticket);
    FAIL() << "a slab that was never attached was received";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("never attached"), std::string::npos) << e.what();
  }
  receiver.attach(ticket.pid, ticket.slab, ::dup(fd));
  SlabTicket bad = ticket;
  bad.sizes = {4, 5};
  bad.strides = {5, 1};  // 20 floats of a 16-float storage
  EXPECT_THROW(receiver.receive(bad), c10::ValueError);
  bad = ticket;
  bad.strides = {-4, 1};
  EXPECT_THROW(receiver.receive(bad), c10::ValueError);
  at::Tensor got = receiver.receive(ticket);  // the bad one claimed nothing
  EXPECT_TRUE(at::equal(got, produced));
  produced.reset();
  got.reset();
  EXPECT_EQ(pool.busy(), 0u);
  at::Tensor next = pool.allocate({4, 4}, at::kFloat);  // generation 2 of the same slab
  ASSERT_TRUE(next.defined());
  try {
    receiver.receive(ticket);
    FAIL() << "a released generation was received";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("released and reused"), std::string::npos) << e.what();
  }
  EXPECT_EQ(pool.busy(), 1u);
}

TEST(ShmSlabs, FullPoolAndZeroBytes) {
  SlabPool pool(1);
  at::Tensor a = filled(pool, 1, 0);
  EXPECT_FALSE(pool.allocate({1, 4}, at::kFloat).defined());
  at::Tensor empty = pool.allocate({0, 4}, at::kFloat);
  EXPECT_TRUE(empty.defined());
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_FALSE(pool.owns(empty));
  EXPECT_EQ(pool.size(), 1u);
}

TEST(ShmSlabs, APoolSendsOnlyItsOwnSlabs) {
  SlabPool a(1);
  at::Tensor t = filled(a, 1, 0);
  for (int k = 0; k < 3; ++k) {  // later pools, possibly at the same address as an earlier one
    SlabPool b(1);
    EXPECT_FALSE(b.owns(t));
    EXPECT_FALSE(b.send(t).has_value());
  }
  EXPECT_FALSE(a.send(at::zeros({2})).has_value()) << "an ordinary tensor has no ticket";
  SlabPool c(1);
  at::Tensor z = c.allocate({2}, at::kComplexFloat);
  EXPECT_FALSE(c.send(z.conj()).has_value()) << "a lazily conjugated view cannot be described by a ticket";
  EXPECT_TRUE(c.send(z).has_value());
}

// A forked child inherits every tensor; whatever it drops, the parent's
// slabs stay held, and the pool refuses to serve the child.
TEST(ShmSlabs, ForkedChildDroppingInheritedTensorsFreesNothing) {
  SlabPool pool(1);
  SlabReceiver receiver;
  at::Tensor produced = filled(pool, 4, 0);
  at::Tensor got = carry(receiver, *pool.send(produced));
  produced.reset();
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    int status = 0;
    got.reset();  // the child's copy of the parent's received tensor
    try {
      pool.allocate({1}, at::kFloat);
      status |= 1;  // must throw: not the pool's process
    } catch (const c10::Error&) {
    }
    if (pool.busy() != 1) status |= 2;
    ::_exit(status);
  }
  int status = -1;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(pool.busy(), 1u) << "the child's drop released the parent's slab";
  EXPECT_FALSE(pool.allocate({4, 4}, at::kFloat).defined());
  EXPECT_TRUE(at::equal(got, at::arange(16, at::kFloat).view({4, 4})));
  got.reset();
  EXPECT_TRUE(pool.allocate({4, 4}, at::kFloat).defined());
}

TEST(ShmSlabs, ThreadsShareAPool) {
  SlabPool pool(4);
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int i = 0; i < 200; ++i) {
        at::Tensor t = pool.allocate({256}, at::kInt);
        if (!t.defined()) continue;
        t.fill_(k * 1000 + i);
        std::this_thread::yield();
        if (!at::equal(t, at::full({256}, k * 1000 + i, at::kInt))) ++wrong;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0) << "two threads got the same slab";
  EXPECT_EQ(pool.busy(), 0u);
}

}  // namespace

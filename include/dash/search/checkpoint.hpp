// Search checkpoints: the SearchState in a small binary file, written atomically (a temporary
// file renamed over the old one, so an interrupted write leaves the previous checkpoint whole).
// The file carries a signature of the run (model, candidates, budget, options, data), and a
// checkpoint is only resumed by a run with the same signature.
//
// Layout, little-endian: "DASHSRCH" u32 version · u64 n · signature (u64 length + bytes) ·
// i64 step · i64 adam_t · f64 logits[n] · f64 adam_m[n] · f64 adam_v[n]
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

#include "dash/core/error.hpp"
#include "dash/search/differentiable_search.hpp"

namespace dash::search {

namespace detail {
inline constexpr char checkpoint_magic[8] = {'D', 'A', 'S', 'H', 'S', 'R', 'C', 'H'};
inline constexpr std::uint32_t checkpoint_version = 1;
}  // namespace detail

inline void save_checkpoint(const std::filesystem::path& path, const SearchState& s, const std::string& signature) {
  const std::filesystem::path partial = path.string() + ".partial";
  {
    std::ofstream out(partial, std::ios::binary | std::ios::trunc);
    require(bool(out), partial.string(), ": cannot open for writing");
    const auto put = [&](const auto& value) { out.write(reinterpret_cast<const char*>(&value), sizeof value); };
    const auto put_doubles = [&](const std::vector<double>& v) {
      out.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(double)));
    };
    out.write(detail::checkpoint_magic, sizeof detail::checkpoint_magic);
    put(detail::checkpoint_version);
    put(std::uint64_t(s.logits.size()));
    put(std::uint64_t(signature.size()));
    out.write(signature.data(), std::streamsize(signature.size()));
    put(std::int64_t(s.step)), put(std::int64_t(s.adam_t));
    put_doubles(s.logits), put_doubles(s.adam_m), put_doubles(s.adam_v);
    out.flush();
    if (!out) {
      out.close();
      std::filesystem::remove(partial);
      fail(partial.string(), ": write failed (disk full?)");
    }
  }
  std::error_code ec;
  std::filesystem::rename(partial, path, ec);
  require(!ec, path.string(), ": cannot replace the checkpoint: ", ec.message());
}

// Throws when the file is not a checkpoint, is damaged, or belongs to another run.
inline SearchState load_checkpoint(const std::filesystem::path& path, const std::string& signature) {
  std::ifstream in(path, std::ios::binary);
  require(bool(in), path.string(), ": cannot open the checkpoint");
  const auto size = std::filesystem::file_size(path);
  const auto get = [&](auto& value, const char* field) {
    in.read(reinterpret_cast<char*>(&value), sizeof value);
    require(bool(in), path.string(), ": ", field, ": the file ends early (truncated checkpoint)");
  };
  char magic[8];
  get(magic, "magic");
  require(std::memcmp(magic, detail::checkpoint_magic, 8) == 0, path.string(), ": not a dash search checkpoint");
  std::uint32_t version = 0;
  get(version, "version");
  require(version == detail::checkpoint_version, path.string(), ": checkpoint version ", version, ", expected ",
          detail::checkpoint_version);
  std::uint64_t n = 0, signature_size = 0;
  get(n, "logit count");
  get(signature_size, "signature length");
  require(signature_size <= size && n <= size / 24, path.string(), ": header counts exceed the file's ", size, " bytes");
  std::string stored(signature_size, '\0');
  in.read(stored.data(), std::streamsize(signature_size));
  require(bool(in), path.string(), ": signature: the file ends early (truncated checkpoint)");
  require(stored == signature, path.string(), ": this checkpoint is from another run (", stored,
          "); this run is (", signature, "). Remove it or run without --resume");
  SearchState s;
  std::int64_t step = 0, adam_t = 0;
  get(step, "step"), get(adam_t, "adam_t");
  s.step = step, s.adam_t = adam_t;
  for (auto* v : {&s.logits, &s.adam_m, &s.adam_v}) {
    v->resize(std::size_t(n));
    in.read(reinterpret_cast<char*>(v->data()), std::streamsize(n * sizeof(double)));
    require(bool(in), path.string(), ": state arrays: the file ends early (truncated checkpoint)");
  }
  require(in.peek() == std::char_traits<char>::eof(), path.string(), ": trailing bytes after the state");
  return s;
}

}  // namespace dash::search

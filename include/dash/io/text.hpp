// Text for evaluation and calibration: a file or a folder of *.txt files (sorted by name), split
// into documents at every `<|endoftext|>` (the TinyStories convention). Each document
// is trimmed of surrounding whitespace; empty ones are dropped.
#pragma once

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "dash/core/error.hpp"

namespace dash::io {

inline std::string trim(const std::string& s) {
  const auto first = s.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return {};
  return s.substr(first, s.find_last_not_of(" \t\r\n") - first + 1);
}

inline std::vector<std::string> split_documents(const std::string& text) {
  static const std::string separator = "<|endoftext|>";
  std::vector<std::string> docs;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t at = text.find(separator, start);
    std::string doc = trim(text.substr(start, at == std::string::npos ? std::string::npos : at - start));
    if (!doc.empty()) docs.push_back(std::move(doc));
    if (at == std::string::npos) break;
    start = at + separator.size();
  }
  return docs;
}

inline std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  require(bool(in), path.string(), ": cannot open for reading");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

inline std::vector<std::filesystem::path> text_files(const std::filesystem::path& path) {
  require(std::filesystem::exists(path), path.string(), ": no such file or folder (--data)");
  if (!std::filesystem::is_directory(path)) return {path};
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(path))
    if (entry.is_regular_file() && entry.path().extension() == ".txt") files.push_back(entry.path());
  std::sort(files.begin(), files.end());
  require(!files.empty(), path.string(), ": no .txt files in this folder (--data)");
  return files;
}

inline std::vector<std::string> read_documents(const std::filesystem::path& path) {
  std::vector<std::string> docs;
  for (const auto& file : text_files(path))
    for (auto& d : split_documents(read_text(file))) docs.push_back(std::move(d));
  require(!docs.empty(), path.string(), ": no text (--data)");
  return docs;
}

}  // namespace dash::io

// Retrieval tasks of `dash eval`: a value hidden in filler text, asked for at the end.
//
//   passkey   "The pass key is 71432. Remember it. 71432 is the pass key." in the classic
//             repeated grass/sky/sun lines; the prompt ends "The pass key is", the answer is " 71432".
//   needle    n_keys statements "<word>: <number>." with distinct words and 7-digit numbers; the
//             prompt ends "What is the number for <word>? <word>:", the answer is " <number>".
//
// A prompt fills its context: the haystack grows a sentence at a time until prompt + answer would
// pass `context` tokens. The needle asked for sits at a depth (the fraction of the haystack's
// sentences before it) spread evenly from 0 to 1 over the prompts; the other needles sit at random
// depths. The question never repeats the value, so the answer can only come from the haystack.
// A model solves a prompt when greedy decoding reproduces the answer (exact_match).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dash/core/error.hpp"
#include "dash/core/rng.hpp"
#include "dash/core/shape.hpp"
#include "dash/io/tokenizer.hpp"

namespace dash::tool {

struct RetrievalPrompt {
  std::string task;        // "passkey" or "needle"
  index_t context = 0;     // target length in tokens: the prompt and answer fit in it
  std::vector<int> ids;    // the prompt followed by the answer's tokens
  index_t answer_begin = 0;  // the answer is ids[answer_begin, ids.size())
  double depth = 0;        // fraction of the haystack's sentences before the needle asked for
};

// The text of the tasks, spelled out so that tests can find each part in a prompt.
namespace retrieval {

// The haystack: these sentences over and over, one round per line.
inline constexpr std::array<std::string_view, 5> filler = {
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."};

inline std::string passkey_needle(std::string_view key) {
  const std::string k(key);
  return "The pass key is " + k + ". Remember it. " + k + " is the pass key.";
}

// A key-value statement: the word, then its number.
inline std::string word_number_needle(std::string_view word, std::string_view number) {
  return std::string(word) + ": " + std::string(number) + ".";
}

// Words the needles are keyed by: common nouns, no one a part of another.
inline constexpr std::array<std::string_view, 48> needle_words = {
    "apple",  "river",  "castle", "tiger",  "violin", "garden", "rocket", "pencil", "island", "candle", "forest", "dragon",
    "mirror", "bottle", "planet", "hammer", "window", "jacket", "monkey", "bridge", "carpet", "lemon",  "anchor", "feather",
    "guitar", "helmet", "kettle", "ladder", "magnet", "pepper", "orange", "parrot", "pillow", "rabbit", "saddle", "spider",
    "tomato", "turtle", "wallet", "wizard", "basket", "button", "cactus", "donkey", "engine", "falcon", "harbor", "jungle"};

// A random number of `digits` digits, no leading zero.
inline std::string random_number(Rng& rng, int digits) {
  std::string s(1, char('1' + rng.below(9)));
  while (int(s.size()) < digits) s += char('0' + rng.below(10));
  return s;
}

// One prompt's text: an introduction, the haystack of `sentences` filler sentences with each
// needle inserted before sentence lround(depth · sentences), and the question.
struct Layout {
  std::string intro;
  std::vector<std::pair<double, std::string>> needles;  // (depth, statement)
  std::string question;
  std::string answer;

  std::string prompt(index_t sentences) const {
    std::string text = intro;
    for (index_t gap = 0; gap <= sentences; ++gap) {
      for (const auto& [depth, statement] : needles) {
        if (std::lround(depth * double(sentences)) != gap) continue;
        text += statement;
        text += ' ';
      }
      if (gap == sentences) break;
      text += filler[std::size_t(gap) % filler.size()];
      text += std::size_t(gap) % filler.size() == filler.size() - 1 ? '\n' : ' ';
    }
    while (!text.empty() && (text.back() == ' ' || text.back() == '\n')) text.pop_back();
    return text + '\n' + question;
  }
};

// The prompt of the largest haystack whose prompt + answer fit in `context` tokens.
inline RetrievalPrompt fit(const io::Tokenizer& tokenizer, bool add_bos, const Layout& layout, std::string task,
                           index_t context, double depth) {
  const auto length = [&](index_t sentences) {
    return index_t(tokenizer.encode(layout.prompt(sentences) + layout.answer, add_bos).size());
  };
  const index_t bare = length(0);
  require(bare <= context, "context: ", context, " tokens cannot hold the ", task, " question and answer (",
          bare, " tokens without any haystack)");
  // Start from the filler's mean tokens per sentence, then step to the largest that fits.
  std::string round;
  for (std::string_view s : filler) round += std::string(s) + ' ';
  const double per_sentence = double(tokenizer.encode(round, false).size()) / double(filler.size());
  index_t sentences = std::max<index_t>(0, index_t(double(context - bare) / per_sentence));
  while (sentences > 0 && length(sentences) > context) --sentences;
  while (length(sentences + 1) <= context) ++sentences;

  RetrievalPrompt p;
  p.task = std::move(task);
  p.context = context;
  p.depth = depth;
  const std::string prompt = layout.prompt(sentences);
  p.ids = tokenizer.encode(prompt + layout.answer, add_bos);
  // Where the prompt's own tokens stop matching, in case the tokenizer merges across the seam.
  const std::vector<int> prompt_ids = tokenizer.encode(prompt, add_bos);
  const auto seam = std::mismatch(prompt_ids.begin(), prompt_ids.end(), p.ids.begin(), p.ids.end());
  p.answer_begin = index_t(seam.second - p.ids.begin());
  require(10 * index_t(p.ids.size()) >= 9 * context, "context: ", context, " tokens is too small for a ", p.task,
          " prompt within 90% of it (", p.ids.size(), " tokens fit)");
  require(p.answer_begin >= 1 && p.answer_begin < index_t(p.ids.size()), "retrieval: the ", p.task,
          " answer has no tokens of its own");
  return p;
}

// Depth of prompt i of `count`: 0 to 1 evenly (the middle for a single prompt).
inline double depth_of(int i, int count) { return count == 1 ? 0.5 : double(i) / double(count - 1); }

}  // namespace retrieval

// `count` prompts, each within [0.9·context, context] tokens, the key at depths spread evenly
// over the haystack (0 to 1; the middle for a single prompt) and drawn at random from `seed`.
inline std::vector<RetrievalPrompt> passkey_prompts(const io::Tokenizer& tokenizer, bool add_bos, index_t context,
                                                    int count, std::uint64_t seed) {
  require(count >= 1, "count: ", count, ", expected at least 1 prompt");
  Rng rng(seed);
  std::vector<RetrievalPrompt> prompts;
  for (int i = 0; i < count; ++i) {
    const std::string key = retrieval::random_number(rng, 5);
    const double depth = retrieval::depth_of(i, count);
    retrieval::Layout layout{
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n",
        {{depth, retrieval::passkey_needle(key)}},
        "What is the pass key? The pass key is",
        " " + key};
    prompts.push_back(retrieval::fit(tokenizer, add_bos, layout, "passkey", context, depth));
  }
  return prompts;
}

// Multi-key needle in a haystack: n_keys needles with distinct words and numbers; the question
// asks for one of them, the one at the prompt's depth.
inline std::vector<RetrievalPrompt> needle_prompts(const io::Tokenizer& tokenizer, bool add_bos, index_t context,
                                                   int count, int n_keys, std::uint64_t seed) {
  require(count >= 1, "count: ", count, ", expected at least 1 prompt");
  require(n_keys >= 1 && std::size_t(n_keys) <= retrieval::needle_words.size(), "n_keys: ", n_keys, ", expected 1..",
          retrieval::needle_words.size());
  Rng rng(seed);
  std::vector<RetrievalPrompt> prompts;
  for (int i = 0; i < count; ++i) {
    // Distinct words: a partial shuffle of the list.
    std::vector<std::string_view> words(retrieval::needle_words.begin(), retrieval::needle_words.end());
    std::vector<std::string> numbers;
    for (int k = 0; k < n_keys; ++k) {
      std::swap(words[std::size_t(k)], words[std::size_t(k) + rng.below(words.size() - std::size_t(k))]);
      std::string number;
      do number = retrieval::random_number(rng, 7);
      while (std::find(numbers.begin(), numbers.end(), number) != numbers.end());
      numbers.push_back(number);
    }
    const double depth = retrieval::depth_of(i, count);
    const std::size_t asked = std::size_t(rng.below(std::uint64_t(n_keys)));
    retrieval::Layout layout;
    layout.intro =
        "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about the numbers afterwards.\n";
    for (std::size_t k = 0; k < std::size_t(n_keys); ++k)
      layout.needles.emplace_back(k == asked ? depth : rng.uniform(),
                                  retrieval::word_number_needle(words[k], numbers[k]));
    const std::string word(words[asked]);
    layout.question = "What is the number for " + word + "? " + word + ":";
    layout.answer = " " + numbers[asked];
    prompts.push_back(retrieval::fit(tokenizer, add_bos, layout, "needle", context, depth));
  }
  return prompts;
}

// Exact match under teacher forcing: next[t] is the model's argmax after ids[0..t]. Greedy
// decoding reproduces the answer iff next[t-1] == ids[t] at every answer position t, so one
// forward pass over the whole of ids decides it.
inline bool exact_match(const RetrievalPrompt& p, std::span<const int> next) {
  require(p.answer_begin >= 1 && p.answer_begin < index_t(p.ids.size()), "exact_match: answer_begin ", p.answer_begin,
          ", expected 1..", index_t(p.ids.size()) - 1);
  require(next.size() + 1 >= p.ids.size(), "exact_match: ", next.size(), " predictions for a ", p.ids.size(),
          "-token prompt, expected at least ", p.ids.size() - 1);
  for (std::size_t t = std::size_t(p.answer_begin); t < p.ids.size(); ++t)
    if (next[t - 1] != p.ids[t]) return false;
  return true;
}

}  // namespace dash::tool

// Retrieval prompts of `dash eval` on stories260K's tokenizer: lengths, where the needle sits,
// that the question does not give the answer away, and exact match under teacher forcing.
#include <doctest/doctest.h>

#include <cctype>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../../examples/dash/retrieval.hpp"
#include "dash/io/tokenizer.hpp"
#include "support/errors.hpp"
#include "support/models.hpp"
#include "support/random.hpp"

using namespace dash;
using tool::RetrievalPrompt;

namespace {

io::Tokenizer tok512() { return io::Tokenizer::llama2c(test::fixtures() / "stories260K" / "tok512.bin", 512); }

// The prompt's text and the answer's, split where the ids split.
struct Text {
  std::string prompt, answer;
};

Text text_of(const io::Tokenizer& tokenizer, const RetrievalPrompt& p) {
  const std::span<const int> ids(p.ids);
  const std::string whole = tokenizer.decode(ids);
  const std::string prompt = tokenizer.decode(ids.first(std::size_t(p.answer_begin)));
  REQUIRE(whole.starts_with(prompt));
  return {prompt, whole.substr(prompt.size())};
}

std::size_t count_of(std::string_view text, std::string_view part) {
  std::size_t n = 0;
  for (std::size_t at = text.find(part); at != std::string_view::npos; at = text.find(part, at + part.size())) ++n;
  return n;
}

index_t filler_sentences(std::string_view text) {
  std::size_t n = 0;
  for (std::string_view s : tool::retrieval::filler) n += count_of(text, s);
  return index_t(n);
}

bool all_digits(std::string_view s) {
  return !s.empty() && s.find_first_not_of("0123456789") == std::string_view::npos;
}

// Every "<word>: <number>." in the text, as (word, number).
std::vector<std::pair<std::string, std::string>> word_numbers(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  for (std::size_t at = text.find(": "); at != std::string::npos; at = text.find(": ", at + 2)) {
    std::size_t word = at;
    while (word > 0 && std::isalpha(static_cast<unsigned char>(text[word - 1]))) --word;
    const std::size_t end = text.find('.', at + 2);
    if (word == at || end == std::string::npos) continue;
    const std::string number = text.substr(at + 2, end - at - 2);
    if (all_digits(number)) out.emplace_back(text.substr(word, at - word), number);
  }
  return out;
}

// The needle statement sits in the haystack after lround(depth · n) of its n filler sentences,
// and the value appears nowhere after it (the question included).
void check_placement(const std::string& prompt, const std::string& needle, std::string_view value, double depth) {
  REQUIRE(count_of(prompt, needle) == 1);
  const std::size_t at = prompt.find(needle);
  const std::string before = prompt.substr(0, at), after = prompt.substr(at + needle.size());
  const index_t n = filler_sentences(before) + filler_sentences(after);
  CHECK(n > 0);
  CHECK(filler_sentences(before) == std::lround(depth * double(n)));
  CHECK(after.find(value) == std::string::npos);
}

std::vector<int> perfect_next(const RetrievalPrompt& p) {
  std::vector<int> next(p.ids.begin() + 1, p.ids.end());
  next.push_back(0);  // after the last token: never read
  return next;
}

}  // namespace

TEST_CASE("retrieval: every prompt fills [0.9·context, context] tokens, answer included") {
  const io::Tokenizer tokenizer = tok512();
  Rng rng = test::rng_for("retrieval lengths");
  for (const index_t context : {index_t(256), index_t(512), index_t(256 + rng.below(768))}) {
    CAPTURE(context);
    std::vector<RetrievalPrompt> prompts = tool::passkey_prompts(tokenizer, true, context, 3, rng.next_u64());
    for (RetrievalPrompt& p : tool::needle_prompts(tokenizer, true, context, 3, 4, rng.next_u64()))
      prompts.push_back(std::move(p));
    for (const RetrievalPrompt& p : prompts) {
      CAPTURE(p.task);
      CHECK(p.context == context);
      CHECK(index_t(p.ids.size()) <= context);
      CHECK(10 * index_t(p.ids.size()) >= 9 * context);
      CHECK(p.ids.front() == tokenizer.bos());
      CHECK(p.answer_begin > 0);
      CHECK(p.answer_begin < index_t(p.ids.size()));
    }
  }
}

TEST_CASE("passkey: the answer is the key, stated once in the haystack at the prompt's depth") {
  const io::Tokenizer tokenizer = tok512();
  Rng rng = test::rng_for("passkey placement");
  const int count = 5;
  const std::vector<RetrievalPrompt> prompts = tool::passkey_prompts(tokenizer, true, 512, count, rng.next_u64());
  REQUIRE(prompts.size() == std::size_t(count));
  for (int i = 0; i < count; ++i) {
    const RetrievalPrompt& p = prompts[std::size_t(i)];
    CAPTURE(i);
    CHECK(p.task == "passkey");
    CHECK(p.depth == doctest::Approx(double(i) / (count - 1)));
    const Text text = text_of(tokenizer, p);
    REQUIRE(text.answer.starts_with(' '));
    const std::string key = text.answer.substr(1);
    CHECK(all_digits(key));
    CHECK(key.size() == 5);
    check_placement(text.prompt, tool::retrieval::passkey_needle(key), key, p.depth);
    CHECK(count_of(text.prompt, key) == 2);  // the needle says it twice; nothing else does
  }
}

TEST_CASE("needle: n_keys distinct needles; the question names one, whose number is the answer") {
  const io::Tokenizer tokenizer = tok512();
  Rng rng = test::rng_for("needle placement");
  const int count = 4;
  const int n_keys = 2 + int(rng.below(4));
  CAPTURE(n_keys);
  const std::vector<RetrievalPrompt> prompts =
      tool::needle_prompts(tokenizer, true, 512, count, n_keys, rng.next_u64());
  REQUIRE(prompts.size() == std::size_t(count));
  for (int i = 0; i < count; ++i) {
    const RetrievalPrompt& p = prompts[std::size_t(i)];
    CAPTURE(i);
    CHECK(p.task == "needle");
    CHECK(p.depth == doctest::Approx(double(i) / (count - 1)));
    const Text text = text_of(tokenizer, p);
    REQUIRE(text.answer.starts_with(' '));
    const std::string number = text.answer.substr(1);
    CHECK(all_digits(number));

    const auto needles = word_numbers(text.prompt);
    CHECK(needles.size() == std::size_t(n_keys));
    std::set<std::string> words, numbers;
    std::string asked_word;
    for (const auto& [word, value] : needles) {
      words.insert(word);
      numbers.insert(value);
      if (value == number) asked_word = word;
    }
    CHECK(words.size() == std::size_t(n_keys));
    CHECK(numbers.size() == std::size_t(n_keys));
    REQUIRE(!asked_word.empty());

    const std::string question = text.prompt.substr(text.prompt.rfind('\n') + 1);
    CHECK(question == "What is the number for " + asked_word + "? " + asked_word + ":");
    check_placement(text.prompt, tool::retrieval::word_number_needle(asked_word, number), number, p.depth);
  }
}

TEST_CASE("retrieval: the seed decides the keys") {
  const io::Tokenizer tokenizer = tok512();
  Rng rng = test::rng_for("retrieval seeds");
  const std::uint64_t seed = rng.next_u64();
  const auto answers = [&](const std::vector<RetrievalPrompt>& prompts) {
    std::vector<std::string> out;
    for (const RetrievalPrompt& p : prompts) out.push_back(text_of(tokenizer, p).answer);
    return out;
  };
  const auto passkeys = [&](std::uint64_t s) { return tool::passkey_prompts(tokenizer, true, 256, 4, s); };
  const auto needles = [&](std::uint64_t s) { return tool::needle_prompts(tokenizer, true, 512, 4, 3, s); };
  CHECK(passkeys(seed)[1].ids == passkeys(seed)[1].ids);
  CHECK(needles(seed)[2].ids == needles(seed)[2].ids);
  CHECK(answers(passkeys(seed)) != answers(passkeys(seed + 1)));
  CHECK(answers(needles(seed)) != answers(needles(seed + 1)));
}

TEST_CASE("exact_match: every answer token must be predicted; tokens before the answer do not count") {
  const io::Tokenizer tokenizer = tok512();
  Rng rng = test::rng_for("exact match");
  const RetrievalPrompt p = tool::needle_prompts(tokenizer, true, 512, 1, 2, rng.next_u64()).front();
  const std::vector<int> perfect = perfect_next(p);
  CHECK(tool::exact_match(p, perfect));

  const auto wrong = [&](int id) { return (id + 1 + int(rng.below(511))) % 512; };
  for (std::size_t t = std::size_t(p.answer_begin); t < p.ids.size(); ++t) {
    CAPTURE(t);
    std::vector<int> next = perfect;
    next[t - 1] = wrong(next[t - 1]);
    CHECK_FALSE(tool::exact_match(p, next));
  }
  std::vector<int> next = perfect;
  for (std::size_t t = 0; t + 1 < std::size_t(p.answer_begin); ++t) next[t] = wrong(next[t]);
  next.back() = wrong(next.back());
  CHECK(tool::exact_match(p, next));
  // The prediction after the last token is not needed.
  CHECK(tool::exact_match(p, std::span<const int>(perfect).first(p.ids.size() - 1)));
}

TEST_CASE("retrieval: bad parameters are refused, naming the parameter") {
  const io::Tokenizer tokenizer = tok512();
  using test::contains;
  using test::error_of;
  CHECK(contains(error_of([&] { tool::passkey_prompts(tokenizer, true, 32, 1, 0); }), "context"));
  CHECK(contains(error_of([&] { tool::needle_prompts(tokenizer, true, 32, 1, 4, 0); }), "context"));
  CHECK(contains(error_of([&] { tool::passkey_prompts(tokenizer, true, 256, 0, 0); }), "count"));
  CHECK(contains(error_of([&] { tool::needle_prompts(tokenizer, true, 256, 0, 4, 0); }), "count"));
  CHECK(contains(error_of([&] { tool::needle_prompts(tokenizer, true, 256, 1, 0, 0); }), "n_keys"));
  const RetrievalPrompt p = tool::passkey_prompts(tokenizer, true, 256, 1, 0).front();
  const std::vector<int> short_next(p.ids.size() - 2, 0);
  CHECK(contains(error_of([&] { tool::exact_match(p, short_next); }), "exact_match"));
  RetrievalPrompt no_prompt = p;
  no_prompt.answer_begin = 0;
  CHECK(contains(error_of([&] { tool::exact_match(no_prompt, perfect_next(p)); }), "answer_begin"));
}

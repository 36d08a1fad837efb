#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../../examples/dash/report_svg.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

using namespace dash;
using tool::Report;
using tool::ReportMethod;
using test::contains;
using test::error_of;
namespace fs = std::filesystem;

namespace {

// ---- A strict reader for the part of XML 1.0 the report uses -----------------------------------
// Elements, attributes in quotes, character data, the five named entities, comments and one
// declaration. Anything else is a std::runtime_error naming where.

struct Element {
  std::string name;
  std::map<std::string, std::string> attributes;
  std::vector<Element> children;
  std::string text;  // character data directly inside, entities decoded
};

class XmlReader {
 public:
  explicit XmlReader(std::string_view document) : s_(document) {}

  Element parse() {
    if (s_.substr(0, 5) == "<?xml") skip_past("?>");
    skip_misc();
    Element root = element();
    skip_misc();
    if (at_ < s_.size()) error("content after the root element");
    return root;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    throw std::runtime_error("XML not well-formed at offset " + std::to_string(at_) + ": " + what);
  }
  bool starts(std::string_view prefix) const { return s_.substr(at_, prefix.size()) == prefix; }
  void skip_past(std::string_view end) {
    const std::size_t found = s_.find(end, at_);
    if (found == std::string_view::npos) error("unterminated construct");
    at_ = found + end.size();
  }
  void skip_space() {
    while (at_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[at_]))) ++at_;
  }
  void skip_misc() {
    for (skip_space(); starts("<!--"); skip_space()) skip_past("-->");
  }
  void expect(char c) {
    if (at_ >= s_.size() || s_[at_] != c) error(std::string("expected '") + c + "'");
    ++at_;
  }
  std::string name() {
    const auto first = [](char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':'; };
    const auto rest = [&](char c) {
      return first(c) || std::isdigit(static_cast<unsigned char>(c)) || c == '-' || c == '.';
    };
    if (at_ >= s_.size() || !first(s_[at_])) error("expected a name");
    const std::size_t start = at_;
    while (at_ < s_.size() && rest(s_[at_])) ++at_;
    return std::string(s_.substr(start, at_ - start));
  }
  // Character data or an attribute value: every '&' must open a known entity.
  std::string decode(std::string_view raw) const {
    static const std::map<std::string, std::string> named = {
        {"lt", "<"}, {"gt", ">"}, {"amp", "&"}, {"quot", "\""}, {"apos", "'"}};
    std::string out;
    for (std::size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] != '&') {
        out += raw[i];
        continue;
      }
      const std::size_t end = raw.find(';', i);
      if (end == std::string_view::npos) error("raw '&'");
      const std::string entity(raw.substr(i + 1, end - i - 1));
      if (!named.count(entity)) error("unknown entity &" + entity + ";");  // the report writes no numeric ones
      out += named.at(entity);
      i = end;
    }
    return out;
  }
  Element element() {
    expect('<');
    Element e;
    e.name = name();
    for (;;) {
      const std::size_t before = at_;
      skip_space();
      if (starts("/>")) {
        at_ += 2;
        return e;
      }
      if (starts(">")) {
        ++at_;
        break;
      }
      if (at_ == before) error("expected space before an attribute");
      const std::string key = name();
      skip_space();
      expect('=');
      skip_space();
      if (at_ >= s_.size() || (s_[at_] != '"' && s_[at_] != '\'')) error("attribute " + key + " not quoted");
      const char quote = s_[at_++];
      const std::size_t end = s_.find(quote, at_);
      if (end == std::string_view::npos) error("unterminated attribute " + key);
      const std::string_view raw = s_.substr(at_, end - at_);
      if (raw.find('<') != std::string_view::npos) error("'<' in attribute " + key);
      if (!e.attributes.emplace(key, decode(raw)).second) error("attribute " + key + " repeated");
      at_ = end + 1;
    }
    for (;;) {
      if (at_ >= s_.size()) error("<" + e.name + "> not closed");
      if (starts("</")) {
        at_ += 2;
        if (name() != e.name) error("</...> does not match <" + e.name + ">");
        skip_space();
        expect('>');
        return e;
      }
      if (starts("<!--")) skip_past("-->");
      else if (starts("<")) e.children.push_back(element());
      else {
        const std::size_t end = std::min(s_.find('<', at_), s_.size());
        const std::string_view raw = s_.substr(at_, end - at_);
        if (raw.find("]]>") != std::string_view::npos) error("']]>' in character data");
        e.text += decode(raw);
        at_ = end;
      }
    }
  }

  std::string_view s_;
  std::size_t at_ = 0;
};

Element parse(const std::string& document) {
  try {
    return XmlReader(document).parse();
  } catch (const std::runtime_error& e) {
    FAIL(e.what());
  }
  return {};
}

void collect(const Element& e, const std::string& name, std::vector<const Element*>& out) {
  if (e.name == name) out.push_back(&e);
  for (const Element& child : e.children) collect(child, name, out);
}

std::vector<const Element*> all(const Element& root, const std::string& name) {
  std::vector<const Element*> out;
  collect(root, name, out);
  return out;
}

const Element* by_id(const Element& e, const std::string& id) {
  if (e.attributes.count("id") && e.attributes.at("id") == id) return &e;
  for (const Element& child : e.children)
    if (const Element* found = by_id(child, id)) return found;
  return nullptr;
}

std::vector<std::string> texts(const Element& root) {
  std::vector<std::string> out;
  for (const Element* t : all(root, "text")) out.push_back(t->text);
  return out;
}

double attribute(const Element& e, const std::string& key) { return std::stod(e.attributes.at(key)); }

// ---- Reports -----------------------------------------------------------------------------------

// A row of probabilities drawn at random.
std::vector<double> random_row(Rng& rng, std::size_t ops) {
  std::vector<double> row(ops);
  double sum = 0;
  for (double& p : row) sum += p = 0.05 + rng.uniform();
  for (double& p : row) p /= sum;
  return row;
}

Report random_report(Rng& rng, std::size_t layers, std::size_t ops, std::size_t records) {
  Report r;
  r.title = "test report";
  for (std::size_t j = 0; j < ops; ++j) r.op_names.push_back("op" + std::to_string(j));
  int step = int(rng.below(5));
  for (std::size_t t = 0; t < records; ++t) {
    r.steps.push_back(step);
    step += 1 + int(rng.below(20));
    r.pi.emplace_back();
    for (std::size_t l = 0; l < layers; ++l) r.pi.back().push_back(random_row(rng, ops));
  }
  for (std::size_t l = 0; l < layers; ++l) r.chosen.push_back(int(rng.below(ops)));
  r.budget_fraction = 0.25;
  r.cost_label = "KV cache (fraction of all-softmax)";
  r.methods = {{"dash", 0.25, 0.04}, {"even", 0.25, 0.07}, {"random", 0.24, 0.09}};
  for (int i = 0; i < 20; ++i) r.methods.push_back({"enumerated", rng.uniform(), 0.01 + rng.uniform()});
  return r;
}

// The cells a heatmap group draws. Each path is one colour; its cells are unit strokes along
// y = row + 0.5, written as M/m moves and h runs in the group's own coordinates.
struct Cells {
  std::map<std::pair<long, long>, std::string> colour;  // (row, column) -> colour
  int drawn_twice = 0;
};

Cells cells_of(const Element& group) {
  Cells cells;
  for (const Element& path : group.children) {
    REQUIRE(path.name == "path");
    const std::string& colour = path.attributes.at("stroke");
    const std::string& d = path.attributes.at("d");
    double x = 0, y = 0;
    const char* p = d.c_str();
    const auto number = [&] {
      char* end = nullptr;
      const double v = std::strtod(p, &end);
      REQUIRE(end != p);
      p = end;
      return v;
    };
    while (*p) {
      const char command = *p++;
      if (command == 'M' || command == 'm') {
        const double a = number();
        while (*p == ' ') ++p;
        const double b = number();
        x = command == 'M' ? a : x + a;
        y = command == 'M' ? b : y + b;
      } else {
        REQUIRE(command == 'h');
        const double run = number();
        REQUIRE(run > 0);
        CHECK(y - std::floor(y) == 0.5);
        for (double c = x; c < x + run; ++c)
          if (!cells.colour.emplace(std::pair{long(std::floor(y)), long(c)}, colour).second) ++cells.drawn_twice;
        x += run;
      }
    }
  }
  return cells;
}

// Translate and scale of a transform "translate(x y) scale(sx sy)".
std::array<double, 4> translate_scale(const std::string& transform) {
  std::array<double, 4> v{};
  REQUIRE(std::sscanf(transform.c_str(), "translate(%lf %lf) scale(%lf %lf)", &v[0], &v[1], &v[2], &v[3]) == 4);
  return v;
}

// A fresh folder under the system's temporary directory, removed afterwards.
struct TempDir {
  fs::path path;
  explicit TempDir(Rng& rng) {
    path = fs::temp_directory_path() / ("dash_report_svg_" + std::to_string(rng.next_u64()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

std::string read(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

std::set<std::string> entries(const fs::path& folder) {
  std::set<std::string> names;
  for (const auto& entry : fs::directory_iterator(folder)) names.insert(entry.path().filename().string());
  return names;
}

}  // namespace

TEST_CASE("The report is well-formed XML with its text escaped") {
  Rng rng = test::rng_for("report escapes");
  Report r = random_report(rng, 4, 3, 5);
  r.title = "a <b> & \"c\" 'd' \x01 e";
  r.op_names[1] = "swa<&>";
  r.cost_label = "cost \"x\" & <y>";
  r.methods.push_back({"mine<&>'", 0.5, 0.02});
  const std::string svg = tool::report_svg(r);
  const Element root = parse(svg);
  CHECK(root.name == "svg");
  CHECK(root.attributes.at("xmlns") == "http://www.w3.org/2000/svg");
  // Control characters, which XML cannot carry, become U+FFFD; the rest reads back unchanged.
  const std::string title = "a <b> & \"c\" 'd' \xEF\xBF\xBD e";
  const std::vector<const Element*> titles = all(root, "title");
  REQUIRE(!titles.empty());
  CHECK(titles[0]->text == title);
  const std::vector<std::string> shown = texts(root);
  for (const std::string& expected : {title, r.op_names[1], r.cost_label, r.methods.back().name})
    CHECK_MESSAGE(std::count(shown.begin(), shown.end(), expected) >= 1, expected);
}

TEST_CASE("Each heatmap draws one cell per layer and record, in the colour of its pi") {
  Rng rng = test::rng_for("report cells");
  for (int trial = 0; trial < 20; ++trial) {
    const std::size_t layers = 1 + rng.below(12), ops = 1 + rng.below(4), records = 1 + rng.below(40);
    CAPTURE(layers);
    CAPTURE(ops);
    CAPTURE(records);
    const Report r = random_report(rng, layers, ops, records);
    const Element root = parse(tool::report_svg(r));
    for (std::size_t j = 0; j < ops; ++j) {
      const Element* group = by_id(root, "pi-" + std::to_string(j));
      REQUIRE(group != nullptr);
      const Cells cells = cells_of(*group);
      CHECK(cells.drawn_twice == 0);
      CHECK(cells.colour.size() == layers * records);
      for (std::size_t l = 0; l < layers; ++l)
        for (std::size_t t = 0; t < records; ++t) {
          const auto it = cells.colour.find({long(l), long(t)});
          REQUIRE(it != cells.colour.end());
          CHECK(it->second == tool::report_detail::pi_colour(r.pi[t][l][j]));
        }
    }
    CHECK(by_id(root, "pi-" + std::to_string(ops)) == nullptr);

    // The chosen column covers every layer once, in its operator's colour, level with the rows.
    const auto [x0, y0, column, row] = translate_scale(by_id(root, "pi-0")->attributes.at("transform"));
    const Element* chosen = by_id(root, "chosen");
    REQUIRE(chosen != nullptr);
    std::vector<int> covered(layers, 0);
    for (const Element& block : chosen->children) {
      if (block.name != "rect") continue;  // the operators' names
      const double first = (attribute(block, "y") - y0) / row;
      const double last = (attribute(block, "y") + attribute(block, "height") - y0) / row;
      CHECK(std::abs(first - std::round(first)) < 1e-3);
      CHECK(std::abs(last - std::round(last)) < 1e-3);
      for (long l = std::lround(first); l < std::lround(last); ++l) {
        REQUIRE((l >= 0 && l < long(layers)));
        ++covered[std::size_t(l)];
        CHECK(block.attributes.at("fill") == tool::report_detail::op_colour(std::size_t(r.chosen[std::size_t(l)])));
      }
    }
    CHECK(std::all_of(covered.begin(), covered.end(), [](int n) { return n == 1; }));
  }
}

TEST_CASE("Many records are thinned to evenly spaced columns from the first to the last") {
  Rng rng = test::rng_for("report thinning");
  // Every record independent and random: nothing merges, the largest file the layout allows.
  const std::size_t layers = 64, ops = 3, records = 1000;
  const Report r = random_report(rng, layers, ops, records);
  const std::string svg = tool::report_svg(r);
  CHECK(svg.size() < 300 * 1024);
  const Element root = parse(svg);
  std::vector<Cells> maps;
  for (std::size_t j = 0; j < ops; ++j) maps.push_back(cells_of(*by_id(root, "pi-" + std::to_string(j))));
  const std::size_t columns = maps[0].colour.size() / layers;
  CHECK(columns >= 50);
  CHECK(columns < records);
  for (const Cells& cells : maps) {
    CHECK(cells.drawn_twice == 0);
    CHECK(cells.colour.size() == layers * columns);
    CHECK(cells.colour.rbegin()->first == std::pair{long(layers - 1), long(columns - 1)});
  }
  // Column k shows record kept[k]: the first record after kept[k-1] whose every cell matches.
  // With random rows no two records look alike, so this finds the record drawn.
  const auto matches = [&](std::size_t k, std::size_t t) {
    for (std::size_t j = 0; j < ops; ++j)
      for (std::size_t l = 0; l < layers; ++l)
        if (maps[j].colour.at({long(l), long(k)}) != tool::report_detail::pi_colour(r.pi[t][l][j])) return false;
    return true;
  };
  std::vector<std::size_t> kept;
  for (std::size_t k = 0, t = 0; k < columns; ++k) {
    while (t < records && !matches(k, t)) ++t;
    REQUIRE(t < records);
    kept.push_back(t++);
  }
  CHECK(kept.front() == 0);
  CHECK(kept.back() == records - 1);
  std::size_t shortest = records, longest = 0;
  for (std::size_t k = 1; k < kept.size(); ++k) {
    shortest = std::min(shortest, kept[k] - kept[k - 1]);
    longest = std::max(longest, kept[k] - kept[k - 1]);
  }
  CHECK(longest - shortest <= 1);
}

TEST_CASE("KL is placed on a log axis and cost on a linear one, whatever the spread of KL") {
  Rng rng = test::rng_for("report axes");
  const auto enumerated = [&](std::vector<double> kls) {
    std::vector<ReportMethod> methods;
    for (const double kl : kls) methods.push_back({"enumerated", rng.uniform(), kl});
    return methods;
  };
  const std::vector<std::pair<std::string, std::vector<ReportMethod>>> cases = {
      {"one point", enumerated({0.05})},
      {"equal KLs", enumerated({0.3, 0.3, 0.3})},
      {"a factor 2", enumerated({0.04, 0.05, 0.08})},
      {"two decades", enumerated({0.011, 0.2, 0.9, 0.05})},
      {"seven decades", enumerated({3e-6, 1e-3, 0.2, 4.0, 20.0})},
  };
  for (const auto& [what, methods] : cases) {
    CAPTURE(what);
    Report r = random_report(rng, 3, 2, 4);
    r.methods = methods;
    const Element root = parse(tool::report_svg(r));

    // Tick labels: at least two, larger values higher up, evenly spaced in log10 of the value.
    const Element* kl_ticks = by_id(root, "kl-ticks");
    REQUIRE(kl_ticks != nullptr);
    REQUIRE(kl_ticks->children.size() >= 2);
    std::vector<std::pair<double, double>> ticks;  // (log10 value, y)
    for (const Element& t : kl_ticks->children) ticks.push_back({std::log10(std::stod(t.text)), attribute(t, "y")});
    const double slope = (ticks.back().second - ticks.front().second) / (ticks.back().first - ticks.front().first);
    CHECK(slope < 0);
    for (const auto& [v, y] : ticks)
      CHECK(std::abs(ticks.front().second + slope * (v - ticks.front().first) - y) < 0.05);

    const Element* cost_ticks = by_id(root, "cost-ticks");
    REQUIRE(cost_ticks->children.size() >= 2);
    const Element& c0 = cost_ticks->children.front();
    const Element& c1 = cost_ticks->children.back();
    const double per_cost = (attribute(c1, "x") - attribute(c0, "x")) / (std::stod(c1.text) - std::stod(c0.text));

    // The points, in the order given, at the same scales.
    const Element* points = by_id(root, "points-enumerated");
    REQUIRE(points->children.size() == methods.size());
    const Element& p0 = points->children[0];
    for (std::size_t i = 0; i < methods.size(); ++i) {
      const Element& p = points->children[i];
      CHECK(std::abs(attribute(p, "cx") - attribute(c0, "x") - per_cost * (methods[i].cost_fraction - std::stod(c0.text))) <
            0.05);
      CHECK(std::abs(attribute(p, "cy") - attribute(p0, "cy") -
                     slope * (std::log10(methods[i].kl) - std::log10(methods[0].kl))) < 0.05);
    }
    // A narrow spread is widened until ticks stand on both sides of it.
    const auto [lo, hi] = std::minmax_element(methods.begin(), methods.end(),
                                              [](const auto& a, const auto& b) { return a.kl < b.kl; });
    if (hi->kl < 3 * lo->kl) {
      CHECK(std::pow(10.0, ticks.front().first) <= lo->kl * (1 + 1e-9));
      CHECK(std::pow(10.0, ticks.back().first) >= hi->kl * (1 - 1e-9));
    }
  }
}

TEST_CASE("Reports whose parts do not fit together are refused naming the field") {
  Rng rng = test::rng_for("report refusals");
  const Report good = random_report(rng, 4, 3, 3);
  CHECK_NOTHROW(tool::report_svg(good));
  const auto refused = [&](auto&& change) {
    Report r = good;
    change(r);
    return error_of([&] { tool::report_svg(r); });
  };
  CHECK(contains(refused([](Report& r) { r.steps.pop_back(); }), "report.steps"));
  CHECK(contains(refused([](Report& r) { r.steps[1] = r.steps[0]; }), "report.steps[1]"));
  CHECK(contains(refused([](Report& r) { r.pi[1].pop_back(); }), "report.pi[1]"));
  CHECK(contains(refused([](Report& r) { r.pi[0][2].push_back(0); }), "report.pi[0][2]"));
  CHECK(contains(refused([](Report& r) { r.pi[2][1][0] = std::nan(""); }), "report.pi[2][1][0]"));
  CHECK(contains(refused([](Report& r) {
                   for (double& p : r.pi[0][3]) p *= 0.9;
                 }), "report.pi[0][3] sums"));
  CHECK(contains(refused([](Report& r) { r.pi.clear(), r.steps.clear(); }), "report.pi"));
  CHECK(contains(refused([](Report& r) { r.op_names.clear(); }), "report.op_names"));
  CHECK(contains(refused([](Report& r) { r.chosen.clear(); }), "report.chosen"));
  CHECK(contains(refused([](Report& r) { r.chosen[2] = 3; }), "report.chosen[2]"));
  CHECK(contains(refused([](Report& r) { r.chosen[0] = -1; }), "report.chosen[0]"));
  CHECK(contains(refused([](Report& r) { r.budget_fraction = std::numeric_limits<double>::infinity(); }),
                 "report.budget_fraction"));
  CHECK(contains(refused([](Report& r) { r.methods[1].kl = 0; }), "report.methods[1] (even).kl"));
  CHECK(contains(refused([](Report& r) { r.methods[0].cost_fraction = std::nan(""); }),
                 "report.methods[0] (dash).cost_fraction"));
}

TEST_CASE("write_report_svg replaces the file whole and leaves nothing else behind") {
  Rng rng = test::rng_for("report writes");
  TempDir dir(rng);
  const fs::path path = dir.path / "report.svg";
  const Report first = random_report(rng, 5, 3, 7);
  tool::write_report_svg(path, first);
  CHECK(read(path) == tool::report_svg(first));
  CHECK(entries(dir.path) == std::set<std::string>{"report.svg"});

  Report second = random_report(rng, 2, 2, 3);
  second.title = "second";
  tool::write_report_svg(path, second);
  CHECK(read(path) == tool::report_svg(second));
  CHECK(entries(dir.path) == std::set<std::string>{"report.svg"});

  // A report refused leaves the file as it was; a folder that is not there is named.
  Report bad = second;
  bad.chosen.push_back(0);
  CHECK(contains(error_of([&] { tool::write_report_svg(path, bad); }), "report.pi[0]"));
  CHECK(read(path) == tool::report_svg(second));
  const fs::path nowhere = dir.path / "missing" / "report.svg";
  CHECK(contains(error_of([&] { tool::write_report_svg(nowhere, first); }), nowhere.string()));
  CHECK(entries(dir.path) == std::set<std::string>{"report.svg"});
}

// The search report as one SVG picture. Left: how the architecture weights pi moved during the
// search, one heatmap per operator (layers down, search steps across) and the operator chosen
// per layer. Right: what each architecture scored against what it costs: held-out KL to the
// teacher on a log axis over cost as a fraction of the all-softmax model, the budget dashed.
//
// Plain SVG 1.1 with presentation attributes only (no scripts, no CSS, no external fonts), so
// browsers and rsvg draw it alike. A heatmap is one stroked path per colour level, each cell a
// unit of its path's coordinates and equal neighbours in a row merged into one run; columns are
// thinned to evenly spaced records when there are more than pixels or than the cell budget, which
// keeps a report for 64 layers and 1000 records in a few hundred KB at worst.
#pragma once

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <numbers>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "dash/core/error.hpp"

namespace dash::tool {

// One architecture scored at the same budget.
struct ReportMethod {
  std::string name;      // "dash", "even", "first-K", "last-K", "random", "kl-guided", "enumerated", ...
  double cost_fraction;  // its cost / the all-softmax model's cost
  double kl;             // held-out KL(teacher || it), nats/token, > 0
};

struct Report {
  std::string title;
  std::vector<std::string> op_names;                  // m operators
  std::vector<int> steps;                             // search step of each record of pi, increasing
  std::vector<std::vector<std::vector<double>>> pi;   // [record][layer][op], rows sum to 1
  std::vector<int> chosen;                            // final op index per layer (L of them)
  double budget_fraction = 0;                         // the budget as a fraction of all-softmax cost
  std::string cost_label;                             // the cost axis' title
  std::vector<ReportMethod> methods;                  // searched, baselines, enumerated architectures
};

namespace report_detail {

// ---- text and numbers --------------------------------------------------------------------------

// Character data and attribute values: the five XML specials as entities; control characters,
// which XML 1.0 cannot carry, as U+FFFD.
inline std::string xml_escape(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      case '\t': case '\n': case '\r': out += ' '; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) out += "\xEF\xBF\xBD";
        else out += c;
    }
  }
  return out;
}

// A coordinate: at most `decimals` decimals, trailing zeros dropped ("12.5", "3").
inline std::string num(double value, int decimals = 2) {
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value, std::chars_format::fixed, decimals);
  std::string text(buffer, result.ptr);
  if (text.find('.') != std::string::npos) {
    text.erase(text.find_last_not_of('0') + 1);
    if (text.back() == '.') text.pop_back();
  }
  return text == "-0" ? "0" : text;
}

// A value for a reader: three significant digits, exponents short ("0.0412", "2e-5").
inline std::string value_label(double value) {
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value, std::chars_format::general, 3);
  std::string text(buffer, result.ptr);
  const std::size_t e = text.find('e');
  if (e != std::string::npos) {
    std::string exponent = text.substr(e + 1);
    const bool negative = exponent[0] == '-';
    exponent.erase(0, exponent.find_first_not_of("+-0"));
    text = text.substr(0, e + 1) + (negative ? "-" : "") + exponent;
  }
  return text;
}

// Width of a label in the sans-serif faces at `size` px: about 0.6 em a character. Only used to
// make room for labels, never to place text that must line up.
inline double text_width(std::string_view text, double size) {
  std::size_t characters = 0;
  for (const char c : text) characters += (static_cast<unsigned char>(c) & 0xC0) != 0x80;  // UTF-8 lead bytes
  return 0.6 * size * double(characters);
}

// ---- colours -----------------------------------------------------------------------------------

// Viridis at nine evenly spaced points: perceptually uniform, ordered dark to light, legible in
// grey and to the common colour-vision deficiencies. Interpolated linearly in between.
inline constexpr std::array<std::array<int, 3>, 9> viridis = {{{0x44, 0x01, 0x54},
                                                               {0x47, 0x2d, 0x7b},
                                                               {0x3b, 0x52, 0x8b},
                                                               {0x2c, 0x72, 0x8e},
                                                               {0x21, 0x91, 0x8c},
                                                               {0x28, 0xae, 0x80},
                                                               {0x5e, 0xc9, 0x62},
                                                               {0xad, 0xdc, 0x30},
                                                               {0xfd, 0xe7, 0x25}}};

inline std::string hex_colour(const std::array<int, 3>& rgb) {
  char buffer[8];
  std::snprintf(buffer, sizeof buffer, "#%02x%02x%02x", rgb[0], rgb[1], rgb[2]);
  return buffer;
}

inline std::string ramp_colour(double t) {
  t = std::clamp(t, 0.0, 1.0) * double(viridis.size() - 1);
  const std::size_t i = std::min(std::size_t(t), viridis.size() - 2);
  const double f = t - double(i);
  std::array<int, 3> rgb{};
  for (int c = 0; c < 3; ++c)
    rgb[c] = int(std::lround(viridis[i][c] + f * (viridis[i + 1][c] - viridis[i][c])));
  return hex_colour(rgb);
}

// pi is drawn in steps of 1/pi_levels: finer than the eye tells apart on the ramp, coarse enough
// that settled weights merge into long runs.
inline constexpr int pi_levels = 100;
inline int pi_level(double p) { return int(std::lround(std::clamp(p, 0.0, 1.0) * pi_levels)); }
inline std::string pi_colour(double p) { return ramp_colour(double(pi_level(p)) / pi_levels); }

// Operators: a categorical palette (Tableau 10) that none of the ramp's colours is mistaken for.
inline std::string op_colour(std::size_t op) {
  static constexpr std::array<const char*, 10> palette = {"#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                                                          "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"};
  return palette[op % palette.size()];
}

// ---- markers -----------------------------------------------------------------------------------

enum class Shape { circle, square, diamond, triangle_up, triangle_down, star };

struct MarkerStyle {
  Shape shape;
  std::string colour;
};

// The searched architecture as a red star; the baselines the tool knows keep one style each
// across reports; other names take the remaining styles in order of first appearance.
inline std::map<std::string, MarkerStyle> method_styles(const std::vector<ReportMethod>& methods) {
  std::map<std::string, MarkerStyle> styles = {
      {"dash", {Shape::star, "#d62728"}},          {"even", {Shape::square, "#4e79a7"}},
      {"first-K", {Shape::triangle_up, "#f28e2b"}}, {"last-K", {Shape::triangle_down, "#59a14f"}},
      {"random", {Shape::diamond, "#b07aa1"}},      {"kl-guided", {Shape::circle, "#17becf"}},
  };
  static constexpr std::array<Shape, 5> shapes = {Shape::circle, Shape::square, Shape::diamond, Shape::triangle_up,
                                                   Shape::triangle_down};
  static constexpr std::array<const char*, 5> colours = {"#9c755f", "#e15759", "#edc948", "#ff9da7", "#76b7b2"};
  std::size_t next = 0;
  for (const ReportMethod& method : methods) {
    if (method.name == "enumerated" || styles.count(method.name)) continue;
    styles[method.name] = {shapes[next % shapes.size()], colours[next % colours.size()]};
    ++next;
  }
  return styles;
}

// A marker of radius r centred at (x, y): one element carrying `attributes` (fill, stroke, ...) and,
// when given, a tooltip.
inline std::string marker(Shape shape, double x, double y, double r, const std::string& attributes,
                          const std::string& tooltip = {}) {
  std::string element, d;
  const auto polygon = [&](std::initializer_list<std::array<double, 2>> points) {
    for (const auto& p : points) {
      d += d.empty() ? 'M' : 'L';
      d += num(x + p[0] * r) + " " + num(y + p[1] * r);
    }
  };
  switch (shape) {
    case Shape::circle: element = "circle"; break;
    case Shape::square: polygon({{-0.85, -0.85}, {0.85, -0.85}, {0.85, 0.85}, {-0.85, 0.85}}); break;
    case Shape::diamond: polygon({{0, -1.15}, {1.15, 0}, {0, 1.15}, {-1.15, 0}}); break;
    case Shape::triangle_up: polygon({{0, -1.15}, {1.05, 0.75}, {-1.05, 0.75}}); break;
    case Shape::triangle_down: polygon({{0, 1.15}, {1.05, -0.75}, {-1.05, -0.75}}); break;
    case Shape::star:
      for (int i = 0; i < 10; ++i) {
        const double angle = std::numbers::pi * (double(i) / 5 - 0.5), radius = i % 2 ? 0.45 : 1.0;
        d += i ? 'L' : 'M';
        d += num(x + r * radius * std::cos(angle)) + " " + num(y + r * radius * std::sin(angle));
      }
      break;
  }
  std::string out = element == "circle"
                        ? "<circle cx=\"" + num(x) + "\" cy=\"" + num(y) + "\" r=\"" + num(r) + "\""
                        : (element = "path", "<path d=\"" + d + "Z\"");
  if (!attributes.empty()) out += " " + attributes;
  return out + (tooltip.empty() ? "/>" : "><title>" + xml_escape(tooltip) + "</title></" + element + ">") + "\n";
}

// ---- axes --------------------------------------------------------------------------------------

// A round step (1, 2 or 5 times a power of ten) that cuts `span` into about `count` pieces.
inline double nice_step(double span, double count) {
  const double raw = span / std::max(count, 1.0);
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  const double fraction = raw / magnitude;
  return magnitude * (fraction < 1.5 ? 1 : fraction < 3.5 ? 2 : fraction < 7.5 ? 5 : 10);
}

inline std::vector<double> linear_ticks(double lo, double hi, double count) {
  if (!(hi > lo)) return {lo};
  const double step = nice_step(hi - lo, count);
  std::vector<double> ticks;
  for (double i = std::ceil(lo / step - 1e-9); i * step <= hi + 1e-9 * step; ++i)
    ticks.push_back(i * step + 0.0);  // + 0.0 turns -0 into 0
  return ticks;
}

// Ticks of a log axis: every decade when the range spans several, 1-2-5 within a decade or two,
// more within less. Any range of at least a factor 3 gets two or more.
inline std::vector<double> log_ticks(double lo, double hi) {
  const double decades = std::log10(hi / lo);
  const std::vector<double> mantissas = decades >= 2.5 ? std::vector<double>{1}
                                        : decades >= 1 ? std::vector<double>{1, 2, 5}
                                                       : std::vector<double>{1, 1.5, 2, 3, 4, 5, 6, 7, 8};
  std::vector<double> ticks;
  for (int e = int(std::floor(std::log10(lo))); e <= int(std::ceil(std::log10(hi))); ++e)
    for (const double m : mantissas) {
      const double v = m * std::pow(10.0, e);
      if (v >= lo * (1 - 1e-12) && v <= hi * (1 + 1e-12)) ticks.push_back(v);
    }
  return ticks;
}

// ---- checks ------------------------------------------------------------------------------------

inline void validate(const Report& report) {
  const std::size_t ops = report.op_names.size(), layers = report.chosen.size(), records = report.pi.size();
  require(ops >= 1, "report.op_names: empty; expected at least one operator");
  require(layers >= 1, "report.chosen: empty; expected one operator index per layer");
  require(records >= 1, "report.pi: no records; expected at least one");
  require(report.steps.size() == records, "report.steps: ", report.steps.size(), " entries; expected ", records,
          ", one per record of report.pi");
  for (std::size_t r = 1; r < records; ++r)
    require(report.steps[r] > report.steps[r - 1], "report.steps[", r, "] = ", report.steps[r],
            "; expected more than report.steps[", r - 1, "] = ", report.steps[r - 1]);
  for (std::size_t r = 0; r < records; ++r) {
    require(report.pi[r].size() == layers, "report.pi[", r, "]: ", report.pi[r].size(), " layers; expected ", layers,
            ", the size of report.chosen");
    for (std::size_t l = 0; l < layers; ++l) {
      const std::vector<double>& row = report.pi[r][l];
      require(row.size() == ops, "report.pi[", r, "][", l, "]: ", row.size(), " values; expected ", ops,
              ", one per report.op_names");
      double sum = 0;
      for (std::size_t j = 0; j < ops; ++j) {
        require(std::isfinite(row[j]) && row[j] >= -1e-6 && row[j] <= 1 + 1e-6, "report.pi[", r, "][", l, "][", j,
                "] = ", row[j], "; expected a probability in [0, 1]");
        sum += row[j];
      }
      require(std::abs(sum - 1) <= 1e-3, "report.pi[", r, "][", l, "] sums to ", sum, "; expected 1");
    }
  }
  for (std::size_t l = 0; l < layers; ++l)
    require(report.chosen[l] >= 0 && std::size_t(report.chosen[l]) < ops, "report.chosen[", l,
            "] = ", report.chosen[l], "; expected an index into report.op_names (", ops, " operators)");
  require(std::isfinite(report.budget_fraction) && report.budget_fraction >= 0,
          "report.budget_fraction = ", report.budget_fraction, "; expected a finite fraction >= 0");
  for (std::size_t i = 0; i < report.methods.size(); ++i) {
    const ReportMethod& method = report.methods[i];
    require(std::isfinite(method.cost_fraction) && method.cost_fraction >= 0, "report.methods[", i, "] (",
            method.name, ").cost_fraction = ", method.cost_fraction, "; expected a finite fraction >= 0");
    require(std::isfinite(method.kl) && method.kl > 0, "report.methods[", i, "] (", method.name,
            ").kl = ", method.kl, "; expected finite and > 0 (the KL axis is logarithmic)");
  }
}

// ---- layout ------------------------------------------------------------------------------------

struct Layout {
  double top = 116;         // top edge of the heatmaps and of the plot
  double height_maps = 0;   // height of the heatmaps and of the plot
  double maps_x = 0;        // left edge of the first heatmap
  double map_width = 0;
  double map_gap = 22;
  double chosen_x = 0;      // the column of chosen operators
  double chosen_width = 14;
  double plot_x = 0, plot_width = 430;
  double legend_x = 0, legend_width = 0;
  double width = 0, height = 0;
};

inline constexpr double margin = 24;
inline constexpr double row_height = 18;  // legend rows
// Heatmap cells of all operators together: bounds the file's size whatever the record count.
inline constexpr std::size_t cell_budget = 24000;

// Records drawn as heatmap columns: all when few, else `columns` evenly spaced ones from the
// first to the last.
inline std::vector<std::size_t> kept_records(std::size_t records, std::size_t columns) {
  columns = std::clamp<std::size_t>(columns, 1, records);
  std::vector<std::size_t> kept(columns);
  for (std::size_t k = 0; k < columns; ++k)
    kept[k] = columns == 1 ? records - 1 : (k * (records - 1) + (columns - 1) / 2) / (columns - 1);
  return kept;
}

// Legend entries other than "enumerated": one per name, best KL first.
struct LegendEntry {
  std::string name;
  double best_kl;
  std::size_t count;
};

inline std::vector<LegendEntry> legend_entries(const std::vector<ReportMethod>& methods) {
  std::vector<LegendEntry> entries;
  for (const ReportMethod& method : methods) {
    if (method.name == "enumerated") continue;
    auto it = std::find_if(entries.begin(), entries.end(), [&](const LegendEntry& e) { return e.name == method.name; });
    if (it == entries.end()) entries.push_back({method.name, method.kl, 1});
    else it->best_kl = std::min(it->best_kl, method.kl), ++it->count;
  }
  std::stable_sort(entries.begin(), entries.end(),
                   [](const LegendEntry& a, const LegendEntry& b) { return a.best_kl < b.best_kl; });
  return entries;
}

inline std::string legend_name(const LegendEntry& entry) {
  return entry.count > 1 ? entry.name + " \xC3\x97" + std::to_string(entry.count) : entry.name;  // "×n"
}

inline std::string chosen_summary(std::size_t count, std::size_t layers) {
  return "chosen in " + std::to_string(count) + " of " + std::to_string(layers) + (layers == 1 ? " layer" : " layers");
}

inline Layout layout(const Report& report) {
  Layout at;
  const double ops = double(report.op_names.size()), layers = double(report.chosen.size());
  at.height_maps = std::max(360.0, 8 * layers);
  at.maps_x = margin + 44;
  // Wide enough for each heatmap's heading ("■ name", "chosen in n of L layers").
  double heading = text_width(chosen_summary(report.chosen.size(), report.chosen.size()), 10);
  for (const std::string& name : report.op_names) heading = std::max(heading, 15 + 1.1 * text_width(name, 13));
  at.map_width = std::ceil(std::max(std::clamp(540 / ops, 100.0, 200.0), heading + 8));
  at.chosen_x = at.maps_x + ops * at.map_width + (ops - 1) * at.map_gap + 16;
  double label_width = text_width("chosen", 10);
  for (const std::string& name : report.op_names) label_width = std::max(label_width, text_width(name, 10));
  // Then 40 px between the panels and 58 for the KL axis' tick labels and title.
  at.plot_x = at.chosen_x + at.chosen_width + 6 + label_width + 40 + 58;
  double name_width = text_width("best enumerated \xE2\x89\xA4 cost", 11);
  for (const LegendEntry& entry : legend_entries(report.methods))
    name_width = std::max(name_width, text_width(legend_name(entry), 11) + 48);
  at.legend_x = at.plot_x + at.plot_width + 24;
  at.legend_width = 22 + name_width;
  at.width = std::ceil(at.legend_x + at.legend_width + margin);
  const double legend_rows = double(legend_entries(report.methods).size()) + 3;
  at.height = std::ceil(std::max(at.top + at.height_maps + 84, at.top + legend_rows * row_height + margin));
  return at;
}

// ---- left panel: pi during the search ---------------------------------------------------------

inline void text(std::string& svg, double x, double y, std::string_view content, const std::string& attributes = {}) {
  svg += "<text x=\"" + num(x) + "\" y=\"" + num(y) + "\"" + (attributes.empty() ? "" : " " + attributes) + ">" +
         xml_escape(content) + "</text>\n";
}

// One operator's heatmap: cell (column k, layer l) is the unit square at (k, l) of the group's
// coordinates, drawn as a unit-long stroke of width 1 along y = l + 0.5 in its level's colour.
inline void heatmap(std::string& svg, const Report& report, std::size_t op, const std::vector<std::size_t>& kept,
                    double x, double y, double width, double height) {
  const std::size_t layers = report.chosen.size(), columns = kept.size();
  struct Pen {  // one colour's path and where it stopped
    std::string d;
    std::size_t column = 0, row = 0;
  };
  std::vector<Pen> pens(pi_levels + 1);
  for (std::size_t l = 0; l < layers; ++l) {
    for (std::size_t k = 0; k < columns;) {
      const int level = pi_level(report.pi[kept[k]][l][op]);
      std::size_t end = k + 1;
      while (end < columns && pi_level(report.pi[kept[end]][l][op]) == level) ++end;
      Pen& pen = pens[std::size_t(level)];
      if (pen.d.empty()) {
        pen.d += 'M';
        pen.d += std::to_string(k) + " " + std::to_string(l) + ".5";
      } else {
        pen.d += 'm';
        pen.d += std::to_string(long(k) - long(pen.column)) + " " + std::to_string(l - pen.row);
      }
      pen.d += 'h';
      pen.d += std::to_string(end - k);
      pen.column = end, pen.row = l;
      k = end;
    }
  }
  svg += "<g id=\"pi-" + std::to_string(op) + "\" transform=\"translate(" + num(x) + " " + num(y) + ") scale(" +
         num(width / double(columns), 4) + " " + num(height / double(layers), 4) +
         ")\" fill=\"none\" stroke-width=\"1\" shape-rendering=\"crispEdges\">\n";
  for (int level = 0; level <= pi_levels; ++level)
    if (!pens[std::size_t(level)].d.empty())
      svg += "<path stroke=\"" + ramp_colour(double(level) / pi_levels) + "\" d=\"" + pens[std::size_t(level)].d +
             "\"/>\n";
  svg += "</g>\n";
  // Tall rows get hairlines between layers, so that neighbours of one colour stay apart.
  const double row = height / double(layers);
  if (layers > 1 && row >= 20) {
    std::string d;
    for (std::size_t l = 1; l < layers; ++l) d += "M" + num(x) + " " + num(y + double(l) * row) + "h" + num(width);
    svg += "<path d=\"" + d + "\" stroke=\"#fff\" stroke-opacity=\"0.6\" stroke-width=\"0.6\"/>\n";
  }
  svg += "<rect x=\"" + num(x) + "\" y=\"" + num(y) + "\" width=\"" + num(width) + "\" height=\"" + num(height) +
         "\" fill=\"none\" stroke=\"#555\" stroke-width=\"0.6\"/>\n";
}

// x, within a heatmap, of search step `step`: columns are equally wide, so a step between two
// kept records lies proportionally between their columns' centres.
inline double step_x(double step, const Report& report, const std::vector<std::size_t>& kept, double column) {
  if (kept.size() == 1) return column / 2;
  std::size_t k = 0;
  while (k + 2 < kept.size() && report.steps[kept[k + 1]] <= step) ++k;
  const double a = report.steps[kept[k]], b = report.steps[kept[k + 1]];
  return (double(k) + 0.5 + (step - a) / (b - a)) * column;
}

inline void pi_panel(std::string& svg, const Report& report, const Layout& at) {
  const std::size_t ops = report.op_names.size(), layers = report.chosen.size();
  const double row = at.height_maps / double(layers), bottom = at.top + at.height_maps;
  const std::size_t columns = std::min<std::size_t>({200, std::size_t(at.map_width), cell_budget / (layers * ops)});
  const std::vector<std::size_t> kept = kept_records(report.pi.size(), std::max<std::size_t>(columns, 8));
  const double column = at.map_width / double(kept.size());

  text(svg, margin, 66, "Architecture weights \xCF\x80 during the search", "font-size=\"14\" font-weight=\"bold\"");

  // Layers down the left edge: as many labels as fit at 11 px apart.
  std::size_t stride = 1;
  for (const std::size_t s : {1, 2, 5, 10, 20, 50, 100})
    if (double(s) * row >= 11) {
      stride = s;
      break;
    }
  svg += "<g font-size=\"10\" fill=\"#555\" text-anchor=\"end\">\n";
  for (std::size_t l = 0; l < layers; l += stride)
    text(svg, at.maps_x - 5, at.top + (double(l) + 0.5) * row + 3.5, std::to_string(l));
  svg += "</g>\n";
  text(svg, 0, 0, "layer",
       "font-size=\"11\" fill=\"#555\" text-anchor=\"middle\" transform=\"translate(" + num(margin + 6) + " " +
           num(at.top + at.height_maps / 2) + ") rotate(-90)\"");

  // Step ticks: round numbers between the first and the last record.
  const double first = report.steps[kept.front()], last = report.steps[kept.back()];
  const std::vector<double> step_ticks = linear_ticks(first, last, std::max(2.0, at.map_width / 60));

  std::vector<std::size_t> chosen_count(ops, 0);
  for (const int c : report.chosen) ++chosen_count[std::size_t(c)];
  for (std::size_t j = 0; j < ops; ++j) {
    const double x = at.maps_x + double(j) * (at.map_width + at.map_gap);
    svg += "<rect x=\"" + num(x) + "\" y=\"" + num(at.top - 36) + "\" width=\"10\" height=\"10\" fill=\"" +
           op_colour(j) + "\"/>\n";
    text(svg, x + 15, at.top - 27, report.op_names[j], "font-size=\"13\" font-weight=\"bold\"");
    text(svg, x, at.top - 10, chosen_summary(chosen_count[j], layers), "font-size=\"10\" fill=\"#666\"");
    heatmap(svg, report, j, kept, x, at.top, at.map_width, at.height_maps);
    svg += "<g font-size=\"10\" fill=\"#555\" text-anchor=\"middle\">\n";
    for (const double s : step_ticks) {
      const double tx = x + step_x(s, report, kept, column);
      svg += "<path d=\"M" + num(tx) + " " + num(bottom) + "v4\" stroke=\"#555\" stroke-width=\"0.8\"/>\n";
      text(svg, tx, bottom + 15, std::to_string(std::llround(s)));
    }
    svg += "</g>\n";
  }
  const double maps_right = at.maps_x + double(ops) * at.map_width + double(ops - 1) * at.map_gap;
  text(svg, (at.maps_x + maps_right) / 2, bottom + 31,
       "search step" + (kept.size() < report.pi.size()
                            ? " (" + std::to_string(kept.size()) + " of " + std::to_string(report.pi.size()) + " records)"
                            : std::string()),
       "font-size=\"11\" fill=\"#555\" text-anchor=\"middle\"");

  // The operator each layer ended with, runs of one operator as one block, named where it fits.
  text(svg, at.chosen_x, at.top - 10, "chosen", "font-size=\"10\" fill=\"#666\"");
  svg += "<g id=\"chosen\">\n";
  for (std::size_t l = 0; l < layers;) {
    std::size_t end = l + 1;
    while (end < layers && report.chosen[end] == report.chosen[l]) ++end;
    const std::size_t op = std::size_t(report.chosen[l]);
    const double y = at.top + double(l) * row, h = double(end - l) * row;
    svg += "<rect x=\"" + num(at.chosen_x) + "\" y=\"" + num(y) + "\" width=\"" + num(at.chosen_width) +
           "\" height=\"" + num(h) + "\" fill=\"" + op_colour(op) + (row >= 4 ? "\" stroke=\"#fff" : "") + "\"/>\n";
    if (h >= 10)
      text(svg, at.chosen_x + at.chosen_width + 5, y + h / 2 + 3.5, report.op_names[op],
           "font-size=\"10\" fill=\"#333\"");
    l = end;
  }
  svg += "</g>\n";

  // Colour bar under the first heatmap.
  const double bar_y = bottom + 44, bar_width = std::min(at.map_width, 160.0);
  svg += "<defs><linearGradient id=\"ramp\" x1=\"0\" y1=\"0\" x2=\"1\" y2=\"0\">";
  for (std::size_t i = 0; i < viridis.size(); ++i)
    svg += "<stop offset=\"" + num(double(i) / double(viridis.size() - 1), 4) + "\" stop-color=\"" +
           hex_colour(viridis[i]) + "\"/>";
  svg += "</linearGradient></defs>\n";
  svg += "<rect x=\"" + num(at.maps_x) + "\" y=\"" + num(bar_y) + "\" width=\"" + num(bar_width) +
         "\" height=\"9\" fill=\"url(#ramp)\" stroke=\"#555\" stroke-width=\"0.6\"/>\n";
  text(svg, at.maps_x - 6, bar_y + 8.5, "\xCF\x80", "font-size=\"12\" text-anchor=\"end\"");
  svg += "<g font-size=\"10\" fill=\"#555\" text-anchor=\"middle\">\n";
  for (const double v : {0.0, 0.5, 1.0}) text(svg, at.maps_x + v * bar_width, bar_y + 21, num(v));
  svg += "</g>\n";
}

// ---- right panel: KL against cost --------------------------------------------------------------

inline void quality_panel(std::string& svg, const Report& report, const Layout& at) {
  const double left = at.plot_x, right = at.plot_x + at.plot_width, top = at.top, bottom = at.top + at.height_maps;
  const double pad = 10;  // points on the range's ends stay clear of the frame

  double cost_max = std::max(1.0, report.budget_fraction), kl_lo = 0.01, kl_hi = 1;
  if (!report.methods.empty()) {
    kl_lo = kl_hi = report.methods[0].kl;
    for (const ReportMethod& m : report.methods) {
      cost_max = std::max(cost_max, m.cost_fraction);
      kl_lo = std::min(kl_lo, m.kl), kl_hi = std::max(kl_hi, m.kl);
    }
  }
  // At least a factor 3 so the axis has ticks to read, then a margin of 6% of the span each side.
  if (kl_hi < 3 * kl_lo) {
    const double centre = std::sqrt(kl_lo * kl_hi);
    kl_lo = centre / std::sqrt(3.0), kl_hi = centre * std::sqrt(3.0);
  }
  const double log_lo = std::log10(kl_lo), log_hi = std::log10(kl_hi), log_pad = 0.06 * (log_hi - log_lo);
  kl_lo = std::pow(10.0, log_lo - log_pad), kl_hi = std::pow(10.0, log_hi + log_pad);

  const auto px = [&](double cost) { return left + pad + cost / cost_max * (at.plot_width - 2 * pad); };
  const auto py = [&](double kl) {
    return bottom - (std::log10(kl) - std::log10(kl_lo)) / (std::log10(kl_hi) - std::log10(kl_lo)) *
                        (at.height_maps);
  };

  text(svg, left - 58, 66, "Quality against cost", "font-size=\"14\" font-weight=\"bold\"");

  // Grid and ticks.
  svg += "<g stroke=\"#e6e6e6\" stroke-width=\"1\">\n";
  const std::vector<double> cost_ticks = linear_ticks(0, cost_max, 5), kl_ticks = log_ticks(kl_lo, kl_hi);
  for (const double c : cost_ticks) svg += "<path d=\"M" + num(px(c)) + " " + num(top) + "V" + num(bottom) + "\"/>\n";
  for (const double k : kl_ticks) svg += "<path d=\"M" + num(left) + " " + num(py(k)) + "H" + num(right) + "\"/>\n";
  svg += "</g>\n";
  svg += "<g id=\"cost-ticks\" font-size=\"10\" fill=\"#555\" text-anchor=\"middle\">\n";
  for (const double c : cost_ticks) text(svg, px(c), bottom + 15, value_label(c));
  svg += "</g>\n<g id=\"kl-ticks\" font-size=\"10\" fill=\"#555\" text-anchor=\"end\">\n";
  for (const double k : kl_ticks) text(svg, left - 5, py(k) + 3.5, value_label(k));
  svg += "</g>\n";
  svg += "<rect x=\"" + num(left) + "\" y=\"" + num(top) + "\" width=\"" + num(at.plot_width) + "\" height=\"" +
         num(at.height_maps) + "\" fill=\"none\" stroke=\"#555\" stroke-width=\"0.6\"/>\n";
  text(svg, (left + right) / 2, bottom + 33, report.cost_label,
       "font-size=\"11\" fill=\"#555\" text-anchor=\"middle\"");
  text(svg, 0, 0, "held-out KL(teacher \xE2\x80\x96 model), nats/token",
       "font-size=\"11\" fill=\"#555\" text-anchor=\"middle\" transform=\"translate(" + num(left - 46) + " " +
           num((top + bottom) / 2) + ") rotate(-90)\"");

  if (report.methods.empty())
    text(svg, (left + right) / 2, (top + bottom) / 2, "no architectures scored",
         "font-size=\"12\" fill=\"#888\" text-anchor=\"middle\"");

  // Enumerated architectures: small and grey, under everything else, with the best KL reached at
  // or below each cost as a staircase.
  std::vector<const ReportMethod*> enumerated;
  for (const ReportMethod& m : report.methods)
    if (m.name == "enumerated") enumerated.push_back(&m);
  if (enumerated.size() >= 2) {
    std::vector<const ReportMethod*> by_cost = enumerated;
    std::stable_sort(by_cost.begin(), by_cost.end(), [](const ReportMethod* a, const ReportMethod* b) {
      return a->cost_fraction < b->cost_fraction || (a->cost_fraction == b->cost_fraction && a->kl < b->kl);
    });
    double best = by_cost[0]->kl;
    std::string d = "M" + num(px(by_cost[0]->cost_fraction)) + " " + num(py(best));
    for (const ReportMethod* m : by_cost)
      if (m->kl < best) best = m->kl, d += "H" + num(px(m->cost_fraction)) + "V" + num(py(best));
    d += "H" + num(px(by_cost.back()->cost_fraction));
    svg += "<path id=\"frontier\" d=\"" + d + "\" fill=\"none\" stroke=\"#9a9a9a\" stroke-width=\"1.2\"/>\n";
  }
  svg += "<g id=\"points-enumerated\" fill=\"#a8a8a8\" fill-opacity=\"0.75\">\n";
  for (const ReportMethod* m : enumerated)
    svg += marker(Shape::circle, px(m->cost_fraction), py(m->kl), 2.4, {},
                  "enumerated: cost " + value_label(m->cost_fraction) + ", KL " + value_label(m->kl));
  svg += "</g>\n";

  // The budget.
  const double bx = px(report.budget_fraction);
  svg += "<path d=\"M" + num(bx) + " " + num(top) + "V" + num(bottom) +
         "\" stroke=\"#333\" stroke-width=\"1\" stroke-dasharray=\"5 4\"/>\n";
  const bool budget_label_left = bx > right - 80;
  text(svg, bx + (budget_label_left ? -5 : 5), top + 13, "budget " + value_label(report.budget_fraction),
       std::string("font-size=\"10\" fill=\"#333\"") + (budget_label_left ? " text-anchor=\"end\"" : ""));

  // Baselines, then the searched architecture on top, named.
  const std::map<std::string, MarkerStyle> styles = method_styles(report.methods);
  svg += "<g id=\"points\" stroke=\"#fff\" stroke-width=\"1\">\n";
  for (const bool searched : {false, true})
    for (const ReportMethod& m : report.methods) {
      if (m.name == "enumerated" || (m.name == "dash") != searched) continue;
      const MarkerStyle& style = styles.at(m.name);
      svg += marker(style.shape, px(m.cost_fraction), py(m.kl), searched ? 9 : 6, "fill=\"" + style.colour + "\"",
                    m.name + ": cost " + value_label(m.cost_fraction) + ", KL " + value_label(m.kl));
    }
  svg += "</g>\n";
  for (const ReportMethod& m : report.methods)
    if (m.name == "dash") {
      const double x = px(m.cost_fraction), y = py(m.kl);
      const bool label_left = x > right - 60;
      text(svg, x + (label_left ? -13 : 13), y + 4.5, "dash",
           std::string("font-size=\"12\" font-weight=\"bold\" fill=\"#d62728\"") +
               (label_left ? " text-anchor=\"end\"" : ""));
    }

  // Legend: best first, with each method's (best) KL.
  const double lx = at.legend_x, value_x = at.legend_x + at.legend_width;
  double y = top + 4;
  if (!report.methods.empty()) {
    text(svg, lx, y, "method", "font-size=\"10\" fill=\"#888\"");
    text(svg, value_x, y, "KL", "font-size=\"10\" fill=\"#888\" text-anchor=\"end\"");
  }
  svg += "<g id=\"legend\" font-size=\"11\">\n";
  for (const LegendEntry& entry : legend_entries(report.methods)) {
    y += row_height;
    const MarkerStyle& style = styles.at(entry.name);
    svg += marker(style.shape, lx + 7, y - 4, entry.name == "dash" ? 7 : 5,
                  "fill=\"" + style.colour + "\" stroke=\"#fff\" stroke-width=\"0.8\"");
    const std::string weight = entry.name == "dash" ? " font-weight=\"bold\"" : "";
    text(svg, lx + 20, y, legend_name(entry), weight.empty() ? std::string() : weight.substr(1));
    text(svg, value_x, y, value_label(entry.best_kl), "text-anchor=\"end\"" + weight);
  }
  if (!enumerated.empty()) {
    y += row_height;
    svg += marker(Shape::circle, lx + 7, y - 4, 2.6, "fill=\"#b4b4b4\"");
    text(svg, lx + 20, y, "enumerated (" + std::to_string(enumerated.size()) + ")", "fill=\"#666\"");
    if (enumerated.size() >= 2) {
      y += row_height;
      svg += "<path d=\"M" + num(lx) + " " + num(y - 4) + "h14\" stroke=\"#9a9a9a\" stroke-width=\"1.2\"/>\n";
      text(svg, lx + 20, y, "best enumerated \xE2\x89\xA4 cost", "fill=\"#666\"");
    }
  }
  svg += "</g>\n";
}

}  // namespace report_detail

// The report as an SVG document. Throws dash::Error naming the field when the report's sizes or
// values do not fit together.
inline std::string report_svg(const Report& report) {
  using namespace report_detail;
  validate(report);
  const Layout at = layout(report);
  std::string svg;
  svg += "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  svg += "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"" + num(at.width) + "\" height=\"" +
         num(at.height) + "\" viewBox=\"0 0 " + num(at.width) + " " + num(at.height) +
         "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"12\" fill=\"#222\">\n";
  svg += "<title>" + xml_escape(report.title) + "</title>\n";
  svg += "<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n";
  text(svg, margin, 32, report.title, "font-size=\"18\" font-weight=\"bold\"");
  pi_panel(svg, report, at);
  quality_panel(svg, report, at);
  svg += "</svg>\n";
  return svg;
}

// Writes the report to `path` through `path`.tmp and a rename, so a reader never sees half a file.
inline void write_report_svg(const std::filesystem::path& path, const Report& report) {
  const std::string svg = report_svg(report);
  std::filesystem::path temporary = path;
  temporary += ".tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    require(bool(out), "report ", path.string(), ": cannot open ", temporary.string(), " for writing");
    out.write(svg.data(), std::streamsize(svg.size()));
    out.close();
    if (!out) {
      std::error_code ignored;
      std::filesystem::remove(temporary, ignored);
      fail("report ", path.string(), ": writing ", temporary.string(), " failed");
    }
  }
  std::error_code error;
  std::filesystem::rename(temporary, path, error);
  if (error) {
    std::error_code ignored;
    std::filesystem::remove(temporary, ignored);
    fail("report ", path.string(), ": cannot move ", temporary.string(), " into place: ", error.message());
  }
}

}  // namespace dash::tool

-- moelab.report — plain-text tables for experiment summaries.
--
--   local report = require "moelab.report"
--   report.print_table(rows, { {"name", "run"}, {"val_loss", "val loss", "%.4f"} })
--
-- rows is an array of tables; each column is { key, title, format }, where
-- format is a string.format pattern (default "%s"). Numbers align right.

local report = {}

local function cell(row, col)
  local v = row[col[1]]
  if v == nil then return "-" end
  if col[3] and type(v) == "number" then return string.format(col[3], v) end
  return tostring(v)
end

function report.format_table(rows, columns)
  local widths, cells = {}, {}
  for j, col in ipairs(columns) do widths[j] = #(col[2] or col[1]) end
  for i, row in ipairs(rows) do
    cells[i] = {}
    for j, col in ipairs(columns) do
      local s = cell(row, col)
      cells[i][j] = s
      if #s > widths[j] then widths[j] = #s end
    end
  end
  local out = {}
  local function line(values, numeric)
    local parts = {}
    for j, s in ipairs(values) do
      local pad = string.rep(" ", widths[j] - #s)
      parts[j] = numeric[j] and pad .. s or s .. pad
    end
    out[#out + 1] = table.concat(parts, "  ")
  end
  local titles, numeric = {}, {}
  for j, col in ipairs(columns) do
    titles[j] = col[2] or col[1]
    numeric[j] = rows[1] ~= nil and type(rows[1][col[1]]) == "number"
  end
  line(titles, numeric)
  local rule = {}
  for j = 1, #columns do rule[j] = string.rep("-", widths[j]) end
  out[#out + 1] = table.concat(rule, "  ")
  for i = 1, #rows do line(cells[i], numeric) end
  return table.concat(out, "\n")
end

function report.print_table(rows, columns)
  print(report.format_table(rows, columns))
end

return report
